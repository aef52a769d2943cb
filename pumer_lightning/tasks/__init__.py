"""Task LightningModules: one thin module per task on a shared base (backbone + reducer + head + metrics).

```python
from pumer_lightning.tasks import NLVR2Task, BackboneSpec
from pumer_lightning.reduce import ReducerSchedule

task = NLVR2Task(backbone=BackboneSpec("vilt_tiny", tokenizer="data/shapes/tokenizer"),
                 reducer=ReducerSchedule(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.2))
```
"""

from .base import (
    BackboneSpec,
    DistillConfig,
    OptimConfig,
    Scored,
    StepOutput,
    TokenTally,
    VLTask,
    no_decay_names,
    step_tokens,
    warmup_decay,
)
from .metrics import GroupedScore, VQAScore, recall_at_k, rerank_recall, topk_candidates
from .nlvr2 import NLVR2Task
from .pretrain import PretrainTask
from .retrieval import RerankConfig, RetrievalTask
from .snli_ve import SNLIVETask
from .vqa import VQATask

#: Task name (``data.task``) -> module class.
TASK_CLASSES: dict[str, type[VLTask]] = {
    "vqa2": VQATask,
    "nlvr2": NLVR2Task,
    "snli_ve": SNLIVETask,
    "retrieval": RetrievalTask,
}

__all__ = [
    "TASK_CLASSES",
    "BackboneSpec",
    "DistillConfig",
    "GroupedScore",
    "NLVR2Task",
    "OptimConfig",
    "PretrainTask",
    "RerankConfig",
    "RetrievalTask",
    "SNLIVETask",
    "Scored",
    "StepOutput",
    "TokenTally",
    "VLTask",
    "VQAScore",
    "VQATask",
    "no_decay_names",
    "recall_at_k",
    "rerank_recall",
    "step_tokens",
    "topk_candidates",
    "warmup_decay",
]
