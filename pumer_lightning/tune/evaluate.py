"""Measuring one schedule on the loaded model, with the drivers' shared layer (`pumer_lightning.lab`).

* **Accuracy** is `pumer_lightning.lab.score.Scorer`: ``trainer.validate`` of the task module with the schedule
  swapped in, the task's main metric (``val/<metric>``) over the first ``n`` batches of a split, with the score of
  every example (VQA: the soft score of the arg-max answer; NLVR2 and SNLI-VE: 1 when the prediction is right),
  whose mean must equal the task's metric; the standard error is then the examples' standard deviation over
  ``sqrt(n)``, and a drop against the unreduced model is paired example by example
  (`pumer_lightning.lab.stats.summarize`, ``paired_drop``). Otherwise (a task whose metric is not a mean over
  examples) it falls back to the binomial ``sqrt(p (1 - p) / n)`` and says so.
* **Speed** and **FLOPs** are `pumer_lightning.lab.compare.compare_schedules`: the task module's evaluation
  forward on ``timing_batches`` batches of the user's batch size, on the user's device, interleaved over the
  settings of one session (always with the unreduced model), medians over rounds, ratios to the unreduced model
  and the round-to-round spread; FLOPs per example of one forward of the first timing batch.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch

from pumer_lightning.callbacks import MAIN_METRIC
from pumer_lightning.data.schema import images_per_record
from pumer_lightning.lab.compare import compare_schedules
from pumer_lightning.lab.context import to_device
from pumer_lightning.lab.score import Batches, Scorer
from pumer_lightning.lab.stats import summarize
from pumer_lightning.models.checkpoint import CheckpointError, load_task_weights
from pumer_lightning.reduce import ReducerSchedule

#: Tasks whose evaluation `make tune` drives (retrieval scores every caption of the split per image batch; its
#: schedules can be tuned by hand with ``python -m pumer_lightning validate``).
SUPPORTED_TASKS = ("vqa2", "nlvr2", "snli_ve")
#: The unreduced model's key in every timing session.
REFERENCE = "off"


def load_weights(model: Any, ckpt: Path) -> None:
    """The task weights of a ``fit`` checkpoint into ``model`` (`load_task_weights`: the recorded architecture
    checked, then strict); errors name ``--ckpt`` and the fix."""
    preset = getattr(getattr(model, "spec", None), "preset", "?")
    what = f"--ckpt {ckpt}"
    try:
        load_task_weights(model, ckpt, what=what, model=f"preset {preset!r}")
    except CheckpointError as err:
        text = str(err)
        if text.startswith(f"{what} ") and ("another architecture" in text or "does not match" in text):
            raise SystemExit(mismatch_message(ckpt, preset, text)) from None
        raise SystemExit(f"error: {text}") from None


def mismatch_message(ckpt: Path, preset: str, error: str) -> str:
    """Why a checkpoint does not fit the configured model (``error``: the loader's message), with the preset its
    own run recorded."""
    details = "; ".join(line.strip() for line in error.splitlines()[1:4])
    hint = "pass the configuration it was trained with"
    config = ckpt.parent.parent / "config.yaml" if ckpt.parent.name == "checkpoints" else None
    if config is not None and config.is_file():
        import yaml

        recorded = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("init_args") or {}
        trained = (recorded.get("backbone") or {}).get("preset")
        if trained and trained != preset:
            hint = (
                f"its run ({config}) trained preset {trained!r}: re-run `make exp` to train the current "
                f"configuration, or add --model.backbone.preset={trained}"
            )
    return (
        f"error: --ckpt {ckpt} does not fit the model the configuration builds (preset {preset!r}): {details}; "
        f"{hint}"
    )


class Evaluator:
    """Accuracy and timing of schedules on one model and one data module (see the module docstring).

    The checkpoint is loaded, and batches are read, on first use: a re-run whose figures are all cached
    loads nothing.
    """

    def __init__(
        self,
        model: Any,
        datamodule: Any,
        ckpt: Path,
        device: torch.device,
        precision: str,
        *,
        batch_size: int,
        timing_batches: int,
        preload_gib: float,
        seed: int = 0,
    ) -> None:
        if model.task_name not in SUPPORTED_TASKS:
            raise SystemExit(
                f"error: make tune evaluates {', '.join(SUPPORTED_TASKS)}; this experiment's task is "
                f"{model.task_name!r} (docs/tune.md#limits)"
            )
        self.model, self.dm, self.ckpt, self.device = model, datamodule, ckpt, device
        self.precision, self.seed = str(precision), seed
        self.batch_size, self.timing_batches, self.preload_gib = batch_size, timing_batches, preload_gib
        self.metric = f"val/{MAIN_METRIC[model.task_name]}"
        self.scorer = Scorer(device, self.precision)
        self._loaded = False
        self._preloaded: dict[str, list[dict[str, Any]]] = {}
        self._timing: dict[str, list[dict[str, Any]]] = {}
        self.timing_sessions = 0

    @property
    def evaluations(self) -> int:
        return self.scorer.evaluations

    def split_batches(self, split: str) -> int:
        """Evaluation batches of ``split`` at the data's evaluation batch size."""
        return max(1, math.ceil(self.dm.split_meta(split).num_samples / self.dm.eval_batch_size))

    def split_examples(self, split: str, n_batches: int) -> int:
        return min(self.dm.split_meta(split).num_samples, n_batches * self.dm.eval_batch_size)

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            load_weights(self.model, self.ckpt)
            self.model.to(self.device).eval()
            self._loaded = True

    def _fits_in_memory(self, split: str) -> bool:
        meta = self.dm.split_meta(split)
        side = self.model.backbone.image_size
        # float32 pixels, twice over for the resize rules that keep the aspect ratio
        per_example = images_per_record(self.dm.task) * 3 * side * side * 4 * 2
        return meta.num_samples * per_example <= self.preload_gib * 2**30

    def _source(self, split: str, n_batches: int) -> Batches:
        """Preloaded batches when the split fits in ``preload_gib`` (read once per run), else a stream."""
        if self._fits_in_memory(split):
            if split not in self._preloaded:
                self._preloaded[split] = list(self.dm.eval_dataloader(split))
            batches = self._preloaded[split]
            return Batches(lambda: batches, min(n_batches, len(batches)))
        return Batches(lambda: self.dm.eval_dataloader(split), n_batches)

    def accuracy(self, schedule: ReducerSchedule | None, split: str, n_batches: int) -> dict[str, Any]:
        """The task's main metric of ``schedule`` on the first ``n_batches`` of ``split`` (`summarize`)."""
        self._ensure_loaded()
        scored = self.scorer.score(
            self.model, self.dm, split, self._source(split, n_batches), schedule, self.seed
        )
        return summarize(scored.value, scored.scores, self.split_examples(split, n_batches))

    def _timing_batches(self, split: str) -> list[dict[str, Any]]:
        """``timing_batches`` batches of ``split`` at the user's batch size, on the device (read once per split)."""
        if split not in self._timing:
            loader = self.dm.eval_dataloader(split, batch_size=self.batch_size)
            batches = itertools.islice(loader, self.timing_batches)
            self._timing[split] = [to_device(b, self.device) for b in batches]
        return self._timing[split]

    def timing(
        self, schedules: dict[str, ReducerSchedule | None], split: str, rounds: int, desc: str
    ) -> dict[str, dict[str, float]]:
        """One interleaved timing session of ``schedules`` (which must include `REFERENCE`): examples/s, speed-up
        over the unreduced model, spread and GFLOPs per example of each."""
        self._ensure_loaded()
        batches = self._timing_batches(split)
        figures = compare_schedules(
            self.model,
            batches,
            schedules,
            rounds,
            warmup=1,
            reference=REFERENCE,
            precision=self.precision,
            desc=desc,
        )
        self.timing_sessions += 1
        return figures
