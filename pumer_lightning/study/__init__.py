"""``make study``: does PuMer keep accuracy? A controlled accuracy-vs-speed study on the shapes world.

    python -m pumer_lightning.study [--budget default|long|quick|gpu] [--task nlvr2|vqa2] [--fresh] [--out results/study]

Everything is generated and trained here, from nothing, on the synthetic shapes world (``pumer_lightning.data.shapes``):

1. **Data**: shapes VQA (pre-training) and shapes NLVR2 (the study task: a true/false statement about an image
   pair, e.g. "the left image contains a red circle"), statement types ``shape``, ``color``, ``exist``.
2. **Pre-training** (cached): a small ViLT (``vilt_small``) learns shapes VQA, the stand-in for the
   vision-language pre-training every PuMer model starts from. Trained from scratch on the NLVR2 statements a
   model of this size stays at chance for thousands of steps (measured: 6000 steps at three learning rates, see
   docs/study.md#design), because a balanced true/false label is a pure text-image interaction with no first-order
   signal.
3. **Baseline** (cached): the unreduced model fine-tuned on NLVR2 from the pre-trained weights.
4. **Training-free**: the baseline's weights evaluated with reducers switched on: PuMer, its parts, random and
   image-CLS pruning at the same token budget (the ablations of `pumer_lightning.reduce.ABLATIONS`, built with
   `ablation`), a keep-ratio sweep, and the pruning control by placement (text-informed against random pruning
   with the reducer at one block only, ``StudyConfig.placement_keep``).
5. **Fine-tuning from the baseline for the same number of steps, once per seed** (``StudyConfig.seeds``: the
   seed orders the training data; every preset has dropout 0): with the reducers off (the matched control), with
   the PuMer reducer on under each text-merge policy (``StudyConfig.policies``) and without text merging;
   optionally (``distil_seeds``) with the reducer on plus distillation from the baseline. The default policy is
   chosen on the validation split. Fine-tuning and evaluation batches pad every text to ``max_text_len``
   (``text_padding``), as the official code does.
6. **Report**: test accuracy per statement type, accuracy on the types the baseline learned (decided on the
   validation split, before looking at test), paired differences, all as means over seeds with standard errors
   that include the seed-to-seed spread (`pumer_lightning.lab.stats.over_seeds`, ``paired_over_seeds``), the
   documented targets met or missed, FLOPs per example and measured throughput for every setting, and a loss check
   (the validation loss each fine-tune minimised, beside its score); ``<out>/shapes.json``, ``shapes.md`` and
   ``shapes.png`` (accuracy vs FLOPs).

The package is split by stage, over `pumer_lightning.lab` (scoring, statistics, timing, reporting):

* `~pumer_lightning.study.config`: the budgets and `StudyConfig` (what the cache keys hash);
* `~pumer_lightning.study.train`: `Study` (data, cached training `Stage` s, model loading) and `train_stages`;
* `~pumer_lightning.study.settings`: the training-free and fine-tuned settings evaluated;
* `~pumer_lightning.study.evaluate`: learned types, fine-tunes, the policy choice, timing, the loss check;
* `~pumer_lightning.study.verdicts`: the paired comparisons and the targets;
* `~pumer_lightning.study.report`: the JSON record, the Markdown tables and the plot;
* `~pumer_lightning.study.run`: `run_study` (the stages in order) and the command line.

Checkpoints and data live under ``--work`` (default ``data/study``, git-ignored); a stage whose inputs did not
change is loaded from its cache, so a second run only re-evaluates. ``--fresh`` retrains everything.
"""

from __future__ import annotations

import pumer_lightning.env  # noqa: F401  (first: passive OpenMP threads and offline hubs, before torch loads)

# isort: split
from .config import BUDGETS, TASK_TEXT, TYPES, Budget, StudyConfig, cache_key
from .run import Results, evaluate, main, run_study
from .train import Stage, Study, Trained, finetune_schedules, train_stages

__all__ = [
    "BUDGETS",
    "TASK_TEXT",
    "TYPES",
    "Budget",
    "Results",
    "Stage",
    "Study",
    "StudyConfig",
    "Trained",
    "cache_key",
    "evaluate",
    "finetune_schedules",
    "main",
    "run_study",
    "train_stages",
]
