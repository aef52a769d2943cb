"""Measuring one schedule on the loaded model: accuracy through the task's own validation code, speed and FLOPs
with the project's one interleaved timer and FLOP counter (`pumer_lightning.measure`).

* **Accuracy** is ``trainer.validate`` of the task module with the schedule swapped in by
  ``model.backbone.using(schedule)``, the same path ``make exp``'s control runs take: the task's main metric
  (``val/<metric>``) over the first ``n`` batches of a split. A forward hook on the task head gives the score of
  every example (VQA: the soft score of the arg-max answer; NLVR2 and SNLI-VE: 1 when the prediction is right),
  whose mean must equal the task's metric; the standard error is then the examples' standard deviation over
  ``sqrt(n)``, and a drop against the unreduced model is paired example by example. Otherwise (a task whose
  metric is not a mean over examples) it falls back to the binomial ``sqrt(p (1 - p) / n)`` and says so.
* **Speed** is the task module's evaluation forward on ``timing_batches`` batches of the user's batch size, on the
  user's device: `interleaved_times` over the settings of one session (always with the unreduced model), medians
  over rounds (`median_rates`), ratios to the unreduced model (`speedup`) and the round-to-round `spread`.
* **FLOPs** per example: `count_flops` of one forward of the first timing batch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer

from pumer_lightning.callbacks import MAIN_METRIC
from pumer_lightning.data.schema import images_per_record
from pumer_lightning.measure import count_flops, interleaved_times, median_rates, speedup, spread
from pumer_lightning.models.checkpoint import unreadable_reason
from pumer_lightning.models.graphed import CudaGraphs
from pumer_lightning.reduce import ReducerSchedule

#: Tasks whose evaluation `make tune` drives (retrieval scores every caption of the split per image batch; its
#: schedules can be tuned by hand with ``python -m pumer_lightning validate``).
SUPPORTED_TASKS = ("vqa2", "nlvr2", "snli_ve")
#: The unreduced model's key in every timing session.
REFERENCE = "off"


def example_scores(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-example score whose mean is the task's main metric (VQA score, accuracy)."""
    if task == "vqa2":
        return labels.float().gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1)
    return (logits.argmax(dim=-1) == labels).float()


class ExampleScores(pl.Callback):
    """Collects `example_scores` of every validation batch from a forward hook on ``pl_module.head``."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.scores: list[float] = []
        self._logits: torch.Tensor | None = None
        self._handle: Any = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.scores = []
        self.close()
        self._handle = pl_module.head.register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        self._logits = output if isinstance(output, torch.Tensor) else None

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        logits, self._logits = self._logits, None
        if logits is not None and isinstance(batch, dict) and "labels" in batch:
            self.scores.extend(example_scores(self.task, logits.detach(), batch["labels"]).tolist())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class Batches:
    """The first ``n`` batches of a re-iterable source, with a length: Lightning takes it as one dataloader."""

    def __init__(self, source: Callable[[], Iterable[dict[str, Any]]], n: int) -> None:
        self.source, self.n = source, n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return itertools.islice(iter(self.source()), self.n)

    def __len__(self) -> int:
        return self.n


class SplitData(pl.LightningDataModule):
    """The experiment's data module as one validation run sees it: ``split`` is the validation split and
    ``batches`` its loader; every other attribute (task, answer vocabulary, skip counts) is the real one's."""

    def __init__(self, datamodule: Any, split: str, batches: Batches) -> None:
        super().__init__()
        self._datamodule, self._batches = datamodule, batches
        self.val_split, self.test_split, self.predict_split = split, None, None

    def setup(self, stage: str | None = None) -> None:
        """The real data module read its metadata already."""

    def val_dataloader(self) -> Batches:
        return self._batches

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._datamodule, name)


def resolve_device(text: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear error otherwise."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise SystemExit(f"error: --device {text!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {text!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {text}: no CUDA device is available here (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """The ``state_dict`` of a ``fit`` checkpoint into ``model``, strictly; errors name ``--ckpt`` and the fix."""
    reason = unreadable_reason(ckpt)
    if reason:
        raise SystemExit(f"error: --ckpt {ckpt} is unreadable: {reason}")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    weights = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise SystemExit(
            f"error: --ckpt {ckpt} holds no state_dict: expected a Lightning checkpoint written by "
            "`make exp` or `python -m pumer_lightning fit` (runs/<name>/version_N/checkpoints/best-*.ckpt)"
        )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise SystemExit(mismatch_message(ckpt, model, err)) from None


def mismatch_message(ckpt: Path, model: Any, err: BaseException) -> str:
    """Why a checkpoint does not fit the configured model, with the preset its own run recorded."""
    first = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
    preset = getattr(getattr(model, "spec", None), "preset", "?")
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
        f"error: --ckpt {ckpt} does not fit the model the configuration builds (preset {preset!r}): {first}; "
        f"{hint}"
    )


def summarize(value: float, scores: list[float], examples: int) -> dict[str, Any]:
    """Metric, standard error and how it was computed (per-example when the scores reproduce the metric)."""
    if len(scores) > 1 and abs(statistics.fmean(scores) - value) < 1e-4:
        se = statistics.stdev(scores) / math.sqrt(len(scores))
        return {"value": value, "se": se, "n": len(scores), "se_kind": "per-example", "scores": scores}
    n = max(1, len(scores) or examples)
    p = min(max(value, 0.0), 1.0)
    return {"value": value, "se": math.sqrt(p * (1 - p) / n), "n": n, "se_kind": "binomial", "scores": []}


def paired_drop(reference: dict[str, Any], result: dict[str, Any]) -> tuple[float, float]:
    """Drop in points against the reference on the same examples, and its standard error (paired over
    examples when both have per-example scores, else from the two standard errors)."""
    a, b = reference.get("scores") or [], result.get("scores") or []
    if len(a) == len(b) and len(a) > 1:
        diffs = [x - y for x, y in zip(a, b)]
        return 100 * statistics.fmean(diffs), 100 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    drop = 100 * (reference["value"] - result["value"])
    return drop, 100 * math.hypot(reference["se"], result["se"])


@contextlib.contextmanager
def cuda_graphs_off(model: Any) -> Iterator[None]:
    """Evaluate eagerly inside the block (FLOP counting, accuracy); the model's setting is restored."""
    spec = getattr(model, "spec", None)
    own = getattr(spec, "cuda_graphs", None)
    if spec is not None:
        spec.cuda_graphs = False
    try:
        yield
    finally:
        if spec is not None:
            spec.cuda_graphs = own


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast a Lightning ``*-mixed`` precision runs the forward under (nothing for ``32-true``)."""
    text = str(precision)
    if text.endswith("-mixed"):
        dtype = torch.bfloat16 if text.startswith("bf16") else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


class Evaluator:
    """Accuracy and timing of schedules on one model and one data module (see the module docstring).

    The checkpoint is loaded, and batches are read, on first use: a re-run whose figures are all cached
    loads nothing.
    """

    def __init__(self, model: Any, datamodule: Any, ckpt: Path, device: torch.device, precision: str, *,
                 batch_size: int, timing_batches: int, preload_gib: float, seed: int = 0) -> None:  # fmt: skip
        if model.task_name not in SUPPORTED_TASKS:
            raise SystemExit(
                f"error: make tune evaluates {', '.join(SUPPORTED_TASKS)}; this experiment's task is "
                f"{model.task_name!r} (docs/tune.md#limits)"
            )
        self.model, self.dm, self.ckpt, self.device = model, datamodule, ckpt, device
        self.precision, self.seed = str(precision), seed
        self.batch_size, self.timing_batches, self.preload_gib = batch_size, timing_batches, preload_gib
        self.metric = f"val/{MAIN_METRIC[model.task_name]}"
        self._loaded = False
        self._trainer: Trainer | None = None
        self._scores = ExampleScores(model.task_name)
        self._preloaded: dict[str, list[dict[str, Any]]] = {}
        self._timing: dict[str, list[dict[str, Any]]] = {}
        self.evaluations = 0
        self.timing_sessions = 0

    def split_batches(self, split: str) -> int:
        """Evaluation batches of ``split`` at the data's evaluation batch size."""
        return max(1, math.ceil(self.dm.split_meta(split).num_samples / self.dm.eval_batch_size))

    def split_examples(self, split: str, n_batches: int) -> int:
        return min(self.dm.split_meta(split).num_samples, n_batches * self.dm.eval_batch_size)

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        load_weights(self.model, self.ckpt)
        self.model.to(self.device).eval()
        accelerator = "gpu" if self.device.type == "cuda" else "cpu"
        self._trainer = Trainer(
            accelerator=accelerator, devices=[self.device.index or 0] if accelerator == "gpu" else 1,
            precision=self.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[self._scores], num_sanity_val_steps=0,
        )  # fmt: skip
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
        data = SplitData(self.dm, split, self._source(split, n_batches))
        torch.manual_seed(self.seed)  # random importance draws the same tokens every time
        try:
            with self.model.backbone.using(schedule), cuda_graphs_off(self.model):
                metrics = self._trainer.validate(self.model, datamodule=data, verbose=False)
        finally:
            self._scores.close()
        self.evaluations += 1
        if not metrics or self.metric not in metrics[0]:
            logged = sorted(metrics[0]) if metrics else []
            raise RuntimeError(f"validation on {split} logged no {self.metric} (logged: {logged})")
        examples = self.split_examples(split, n_batches)
        return summarize(float(metrics[0][self.metric]), list(self._scores.scores), examples)

    def _timing_batches(self, split: str) -> list[dict[str, Any]]:
        """``timing_batches`` batches of ``split`` at the user's batch size, on the device (read once per split)."""
        if split not in self._timing:
            own = self.dm.eval_batch_size
            self.dm.eval_batch_size = self.batch_size
            try:
                batches = list(itertools.islice(iter(self.dm.eval_dataloader(split)), self.timing_batches))
            finally:
                self.dm.eval_batch_size = own
            self._timing[split] = [
                {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                for b in batches
            ]
        return self._timing[split]

    def timing(
        self, schedules: dict[str, ReducerSchedule | None], split: str, rounds: int, desc: str
    ) -> dict[str, dict[str, float]]:
        """One interleaved timing session of ``schedules`` (which must include `REFERENCE`): examples/s, speed-up
        over the unreduced model, spread and GFLOPs per example of each."""
        if REFERENCE not in schedules:
            raise ValueError(f"a timing session needs the unreduced model ({REFERENCE!r}) as its reference")
        self._ensure_loaded()
        batches = self._timing_batches(split)
        model, backbone = self.model, self.model.backbone
        examples = sum(int(b["pixel_values"].shape[0]) for b in batches)
        model.eval()
        if self.device.type == "cuda":
            # fresh CUDA graphs: room for one per setting and batch shape, so none runs eagerly mid-session
            model.cuda_graphs = CudaGraphs(max_graphs=len(schedules) * len(batches) + 1)
        with torch.inference_mode(), autocast_for(self.precision, self.device):
            flops = {}
            for name, schedule in schedules.items():
                with backbone.using(schedule), cuda_graphs_off(model):
                    flops[name] = count_flops(lambda: model(batches[0])) / batches[0]["pixel_values"].shape[0]

            def passes() -> None:
                for batch in batches:
                    model(batch)

            times = interleaved_times(
                {name: passes for name in schedules}, rounds, warmup=1, sync=self.device,
                context=lambda name: backbone.using(schedules[name]), desc=desc,
            )  # fmt: skip
        self.timing_sessions += 1
        rates = median_rates(times, examples)
        return {
            name: {
                "examples_per_sec": rates[name],
                "speedup": speedup(times, REFERENCE, name),
                "spread": spread(times[name]),
                "gflops_per_example": flops[name] / 1e9,
                "examples": examples,
                "rounds": rounds,
            }
            for name in schedules
        }
