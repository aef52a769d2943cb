"""PuMer token reduction as pure tensor functions: importance, pruning, merging, and the schedule.

Nothing here knows about models, Lightning or configs; backbones call these functions.
"""

from .merge import image_merge_slots, merge_by_slots, size_bias, text_merge_slots
from .prune import attention_probs, cls_importance, random_importance, text_importance, topk_keep_index
from .reducer import ReductionState, ReductionTrace, reduce
from .schedule import IMPORTANCE_SOURCES, LayerPlan, ReducerSchedule

__all__ = [
    "IMPORTANCE_SOURCES",
    "LayerPlan",
    "ReducerSchedule",
    "ReductionState",
    "ReductionTrace",
    "attention_probs",
    "cls_importance",
    "image_merge_slots",
    "merge_by_slots",
    "random_importance",
    "reduce",
    "size_bias",
    "text_importance",
    "text_merge_slots",
    "topk_keep_index",
]
