"""PuMer token reduction as pure tensor functions: importance, pruning, merging, and the schedule.

Nothing here knows about models, Lightning or configs; backbones call these functions.
"""

from .merge import key_metric, match_slots, merge_by_slots, size_bias
from .prune import (
    attention_probs,
    cls_importance,
    fp32_contiguous,
    random_importance,
    text_importance,
    topk_keep_index,
)
from .reducer import ReductionState, ReductionTrace, reduce
from .schedule import (
    ABLATIONS,
    IMPORTANCE_SOURCES,
    PARTITIONS,
    TEXT_MERGE_POLICIES,
    LayerPlan,
    ReducerSchedule,
    ablation,
)

__all__ = [
    "ABLATIONS",
    "IMPORTANCE_SOURCES",
    "PARTITIONS",
    "TEXT_MERGE_POLICIES",
    "LayerPlan",
    "ReducerSchedule",
    "ReductionState",
    "ReductionTrace",
    "ablation",
    "attention_probs",
    "cls_importance",
    "fp32_contiguous",
    "key_metric",
    "match_slots",
    "merge_by_slots",
    "random_importance",
    "reduce",
    "size_bias",
    "text_importance",
    "topk_keep_index",
]
