"""Task LightningModules: one thin module per task on a shared base (backbone + reducer + head + metrics).

```python
from pumer_lightning.tasks import NLVR2Task, BackboneSpec
from pumer_lightning.reduce import ReducerSchedule

task = NLVR2Task(backbone=BackboneSpec("vilt_tiny", tokenizer="data/shapes/tokenizer"),
                 reducer=ReducerSchedule(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.2))
```

Modules, one idea each: `base` (`VLTask`, the shared LightningModule), `config` (`OptimConfig`,
`DistillConfig`), `outputs` (`TokenTally`, `Scored`, `StepOutput`: what a step hands the callbacks), `optim`
(parameter groups, warmup then decay), `skips` (the report of the examples the data dropped), `metrics`, and
one module per task. The backbone's spec, construction and distillation teacher are in
`pumer_lightning.models.spec`.
"""

from pumer_lightning.models.spec import BackboneSpec

from .base import VLTask
from .config import DistillConfig, OptimConfig
from .metrics import GroupedScore, VQAScore, recall_at_k, rerank_recall, topk_candidates
from .nlvr2 import NLVR2Task
from .optim import no_decay_names, warmup_decay
from .outputs import Scored, StepOutput, TokenTally, step_tokens
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
