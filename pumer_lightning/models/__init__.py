"""Backbones (ViLT, METER) with PuMer reducers, task heads, and checkpoint loading/conversion.

```python
from pumer_lightning.models import build_backbone, build_head
from pumer_lightning.reduce import ReducerSchedule

backbone = build_backbone("vilt_tiny", reducer=ReducerSchedule(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.2))
head = build_head("vqa2", backbone.hidden_size, num_answers=10, width=backbone.head_width)
out = backbone(pixel_values, input_ids, attention_mask)
logits = head(out.pooled)
```
"""

from .base import Backbone, BackboneOutput
from .build import PRESETS, build_backbone, preset_config, preset_depth, preset_family, preset_image_size
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    load_head_weights,
    read_checkpoint,
    save_checkpoint,
)
from .heads import TASKS, ClassifierHead, RetrievalHead, RetrievalScores, build_head
from .meter import MeterBackbone, MeterConfig
from .spec import BackboneSpec
from .vilt import ViltBackbone, vilt_config

__all__ = [
    "PRESETS",
    "TASKS",
    "Backbone",
    "BackboneOutput",
    "BackboneSpec",
    "Checkpoint",
    "CheckpointError",
    "ClassifierHead",
    "MeterBackbone",
    "MeterConfig",
    "RetrievalHead",
    "RetrievalScores",
    "ViltBackbone",
    "build_backbone",
    "build_head",
    "load_head_weights",
    "preset_config",
    "preset_depth",
    "preset_family",
    "preset_image_size",
    "read_checkpoint",
    "save_checkpoint",
    "vilt_config",
]
