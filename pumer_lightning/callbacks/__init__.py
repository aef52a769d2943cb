"""Callbacks that make token reduction visible: token counts, FLOPs, throughput, pictures, hyper-parameters."""

from .checkpoint import PreemptionCheckpoint, TaskCheckpoint
from .hparams import MAIN_METRIC, HParamsCallback
from .token_stats import LAYOUT, TokenStatsCallback, add_layout, tensorboard_writer
from .token_vis import TokenVisCallback, reduction_panel, text_groups

__all__ = [
    "LAYOUT",
    "MAIN_METRIC",
    "HParamsCallback",
    "PreemptionCheckpoint",
    "TaskCheckpoint",
    "TokenStatsCallback",
    "TokenVisCallback",
    "add_layout",
    "reduction_panel",
    "tensorboard_writer",
    "text_groups",
]
