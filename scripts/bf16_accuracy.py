"""bf16-true against fp32 test accuracy of a paper-protocol study checkpoint (shapes NLVR2, default budget, seed 0:
the baseline arm unreduced and the PuMer `pads_first` arm under its schedule), scored through the study's own
evaluation path (`pumer_lightning.lab.score.Scorer`) at each precision.

Run after `make study` (it reads the study's cache and trains nothing: it stops unless the cached pre-trained start
was made for this work directory): `.venv/bin/python scripts/bf16_accuracy.py`, or with `STUDY_WORK=<dir>/paper`
when the study ran with `--work <dir>`. Figures: docs/bench.md#accuracy-in-bf16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pumer_lightning.lab.score import Scorer
from pumer_lightning.study.config import EXPERIMENTS, PaperConfig
from pumer_lightning.study.evaluate import eval_data
from pumer_lightning.study.train import (
    Study,
    pretrain_overrides,
    pretrained_start,
    train_first_arms,
)
from pumer_lightning.tasks.pretrain import MADE_BY, pretrain_key, shown

WORK = Path(
    os.environ.get("STUDY_WORK", "data/study/paper")
)  # as `make study` names it (its cache keys name it)


def main() -> None:
    cfg = PaperConfig(task="nlvr2", budget="default")
    st = Study(cfg, WORK, False, "cpu", 1)
    out = WORK / "pretrained" / cfg.budget
    files = [shown(EXPERIMENTS / "base.yaml"), shown(EXPERIMENTS / "shapes_pretrain.yaml")]
    key = pretrain_key(files, [*pretrain_overrides(cfg, WORK, "cpu"), str(out)])
    made = json.loads((out / MADE_BY).read_text()) if (out / MADE_BY).is_file() else {}
    if made.get("key") != key:
        raise SystemExit(f"no paper-protocol study cached under {WORK} (run `make study`, or set STUDY_WORK)")
    st.world([cfg.task], cfg.recipe.types, cfg.paper)
    start = pretrained_start(st, fresh=False)
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
