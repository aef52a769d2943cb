"""``make study``: does PuMer keep accuracy? A controlled accuracy-vs-speed study on the shapes world.

    python -m pumer_lightning.study [--protocol paper|adaptation] [--budget ...] [--task vqa2|nlvr2|all] [--fresh]

Two protocols (docs/study.md):

* **paper** (the default and the headline): per task (shapes VQA and shapes NLVR2) and per seed, every arm
  fine-tunes the same pre-trained shapes checkpoint (ITM + MLM over captions, no task labels, made once by the
  pre-training command and cached) with the task's recipe (``config.RECIPES``, its experiment file's): (a) the baseline
  with the reducers off, (b) PuMer on under each text-merge policy, (c) PuMer distilled from the seed's baseline,
  (d) PuMer for 2N steps when (b) and (c) miss on validation. The policy, the 2N arm and the arm are chosen on
  validation; test is read once. On the new baselines: the training-free stages below. Budgets ``default``
  (1 h 48 min measured on 2 CPU cores), ``quick``, ``gpu``; outputs ``<out>/paper_<task>.{json,md,png}``.
* **adaptation** (``--protocol adaptation``, the earlier runs), below: fine-tunes that continue from an already
  fine-tuned baseline.

The adaptation protocol: everything is generated and trained here, from nothing, on the synthetic shapes world
(``pumer_lightning.data.shapes``; docs/study.md#design says why each step is as it is):

1. **Data**: shapes VQA (pre-training) and shapes NLVR2 (the study task: a true/false statement about an image
   pair), statement types ``shape``, ``color``, ``exist``.
2. **Pre-training** (cached): a small ViLT (``vilt_small``) learns shapes VQA from scratch, the stand-in for
   vision-language pre-training (NLVR2 from scratch stays at chance at this size).
3. **Baseline** (cached): the unreduced model fine-tuned on NLVR2 from the pre-trained weights.
4. **Training-free**: the baseline's weights with reducers switched on: PuMer, its ablations
   (`pumer_lightning.reduce.ABLATIONS`), a keep-ratio sweep and the pruning control by placement.
5. **Fine-tuning from the baseline, once per seed** (``StudyConfig.seeds``: the order of the training data): the
   matched control (reducers off), PuMer under each text-merge policy (the default chosen on validation) and
   without text merging, optionally PuMer distilled from the baseline (``distil_seeds``); texts padded to
   ``max_text_len``.
6. **Report**: test accuracy per statement type and on the types the baseline learned (decided on validation),
   paired differences, means over seeds with seed-inclusive standard errors (`pumer_lightning.lab.stats`), the
   documented targets, FLOPs and throughput per setting, and a loss check; ``<out>/shapes.{json,md,png}``.

The package is split by stage, each module holding both protocols' part of it, over `pumer_lightning.lab`
(scoring, statistics, timing, reporting):

* `~pumer_lightning.study.config`: the budgets, `StudyConfig` (what the cache keys hash), the paper protocol's
  recipes and `PaperConfig`;
* `~pumer_lightning.study.train`: `Study` (data, cached training `Stage` s, model loading) and the `Arms` (stages
  trained once per seed); the adaptation's `train_stages`; the paper protocol's pre-trained start and first arms;
* `~pumer_lightning.study.settings`: the training-free and fine-tuned settings evaluated;
* `~pumer_lightning.study.evaluate`: scoring, learned types, the settings on test, timing; the adaptation's policy
  choice, loss check and `evaluate`; the paper protocol's choices on validation and `evaluate_paper`;
* `~pumer_lightning.study.verdicts`: the paired comparisons and the targets;
* `~pumer_lightning.study.report`: the JSON records, the Markdown tables and the plot;
* `~pumer_lightning.study.run`: `run_study`, `run_paper` (the stages in order) and the command line.

Both protocols train through the same `Arms` and `Study.train` and evaluate through the same stages; they differ
in where the arms start and what validation chooses.

Checkpoints and data live under ``--work`` (default ``data/study``, git-ignored; the paper protocol's under
``<work>/paper``); a stage whose inputs did not change is loaded from its cache, so a run stopped part-way resumes
where it stopped and a second run only re-evaluates. ``--fresh`` retrains everything.
"""

from __future__ import annotations

import pumer_lightning.env  # noqa: F401  (first: passive OpenMP threads and offline hubs, before torch loads)

# isort: split
from .config import BUDGETS, PAPER_BUDGETS, Budget, PaperBudget, PaperConfig, StudyConfig, cache_key
from .run import main, run_paper, run_study
from .train import Stage, Study

__all__ = [
    "BUDGETS",
    "PAPER_BUDGETS",
    "Budget",
    "PaperBudget",
    "PaperConfig",
    "Stage",
    "Study",
    "StudyConfig",
    "cache_key",
    "main",
    "run_paper",
    "run_study",
]
