"""bf16-true against fp32 test accuracy of a paper-protocol study checkpoint (shapes NLVR2, default budget, seed 0:
the baseline arm unreduced and the PuMer `pads_first` arm under its schedule), scored through the study's own
evaluation path (`pumer_lightning.lab.score.Scorer`) at each precision.

Run after `make study` (it reads the study's cache and trains nothing: it stops unless the cached pre-trained start
was made for this work directory): `.venv/bin/python scripts/bf16_accuracy.py`, or with `STUDY_WORK=<dir>/paper`
when the study ran with `--work <dir>`. Figures: docs/bench.md#accuracy-in-bf16.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pumer_lightning.lab.score import Scorer
from pumer_lightning.study.config import PaperConfig
from pumer_lightning.study.evaluate import eval_data
from pumer_lightning.study.train import Study, pretrained_start, train_first_arms

WORK = Path(
    os.environ.get("STUDY_WORK", "data/study/paper")
)  # as `make study` names it (its cache keys name it)


def main() -> None:
    cfg = PaperConfig(task="nlvr2", budget="default")
    st = Study(cfg, WORK, False, "cpu", 1)
    st.world([cfg.task], cfg.recipe.types, cfg.paper)
    start = pretrained_start(st, fresh=False, make=False)  # stops unless `make study` made it for this WORK
    arms = train_first_arms(st, start)  # every arm is in the cache: loads, trains nothing
    test = eval_data(st).test
    for arm in ("baseline", "pumer_pads_first"):
        for precision in ("32-true", "bf16-true"):
            model = st.load(arms.checkpoints[arm][0], start.path, cfg.task)
            out = Scorer(torch.device("cpu"), precision).score(
                model, test.dm, test.name, test.batches, arms.schedules[arm]
            )
            print(
                f"{arm} (seed 0) {precision}: test accuracy {100 * out.value:.2f}% over {len(out.scores)} examples"
            )


if __name__ == "__main__":
    main()
