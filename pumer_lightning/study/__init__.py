"""``make study``: does PuMer keep accuracy? A controlled accuracy-vs-speed study on the shapes world.

    python -m pumer_lightning.study [--protocol paper|adaptation] [--budget ...] [--task vqa2|nlvr2|all] [--fresh]

Two protocols (docs/study.md):

* **paper** (the default and the headline; `pumer_lightning.study.paper`, ``paper_eval``, ``paper_report``): per
  task (shapes VQA and shapes NLVR2) and per seed, every arm fine-tunes the same pre-trained shapes checkpoint
  (ITM + MLM over captions, no task labels, made once by the pre-training command and cached): (a) the baseline
  with the reducers off, (b) PuMer on under each text-merge policy, (c) PuMer distilled from the seed's baseline,
  (d) PuMer for 2N steps when (b) and (c) miss on validation. The policy, the 2N arm and the arm are chosen on
  validation; test is read once. On the new baselines: the training-free stages below. Budgets ``default``
  (about 3 hours on 2 CPU cores), ``quick``, ``gpu``; outputs ``<out>/paper_<task>.{json,md,png}``.
* **adaptation** (``--protocol adaptation``, the earlier runs), below: fine-tunes that continue from an already
  fine-tuned baseline.

The adaptation protocol: everything is generated and trained here, from nothing, on the synthetic shapes world
(``pumer_lightning.data.shapes``):

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
* `~pumer_lightning.study.paper`, ``paper_eval``, ``paper_report``: the paper protocol's configuration and arms,
  its choices and evaluation, its record and report;
* `~pumer_lightning.study.run`: `run_study`, `run_paper` (the stages in order) and the command line.

Checkpoints and data live under ``--work`` (default ``data/study``, git-ignored; the paper protocol's under
``<work>/paper``); a stage whose inputs did not change is loaded from its cache, so a run stopped part-way resumes
where it stopped and a second run only re-evaluates. ``--fresh`` retrains everything.
"""

from __future__ import annotations

import pumer_lightning.env  # noqa: F401  (first: passive OpenMP threads and offline hubs, before torch loads)

# isort: split
from .config import BUDGETS, TASK_TEXT, TYPES, Budget, StudyConfig, cache_key
from .paper import PAPER_BUDGETS, RECIPES, PaperBudget, PaperConfig
from .run import Results, evaluate, main, run_paper, run_study
from .train import Stage, Study, Trained, finetune_schedules, train_stages

__all__ = [
    "BUDGETS",
    "PAPER_BUDGETS",
    "RECIPES",
    "TASK_TEXT",
    "TYPES",
    "Budget",
    "PaperBudget",
    "PaperConfig",
    "Results",
    "Stage",
    "Study",
    "StudyConfig",
    "Trained",
    "cache_key",
    "evaluate",
    "finetune_schedules",
    "main",
    "run_paper",
    "run_study",
    "train_stages",
]
