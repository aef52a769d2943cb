"""Token statistics, FLOPs, throughput and per-layer time, under stable TensorBoard tags with a dashboard layout.

Tags (``XX`` = zero-padded layer index; ``<stage>`` = ``val`` or ``test``):

| tag | when | meaning |
|---|---|---|
| ``tokens/image/layer_XX``, ``tokens/text/layer_XX`` | training steps | mean tokens entering layer XX per backbone pass |
| ``<stage>/tokens/image/layer_XX``, ``<stage>/tokens/text/layer_XX`` | epoch end | the same over the epoch |
| ``tokens/per_pass``, ``<stage>/tokens/per_pass`` | as above | tokens summed over layers (image + text) |
| ``<stage>/gflops_per_example`` | epoch end | forward GFLOPs per example counted on the first batch (matmuls and attention) |
| ``throughput/train_samples_per_sec``, ``throughput/train_tokens_per_sec`` | every ``window`` steps | |
| ``throughput/<stage>_samples_per_sec``, ``throughput/<stage>_tokens_per_sec`` | epoch end | |
| ``<stage>/time/layer_XX_ms`` | epoch end, with ``layer_time=True`` | forward time of layer XX per batch |

(The ``data/skipped/<split>/<reason>`` counts of dropped examples come from the task module:
`pumer_lightning.tasks.skips`.)

The counts come from the step's return value: every training, validation and test step of a `VLTask` returns a
`StepOutput` whose ``tokens`` (`TokenTally`) this callback reads as Lightning's ``outputs`` in ``on_*_batch_end``.

Under DDP every value is the logging rank's own (rank 0's reaches TensorBoard): no collective runs, so ranks
that saw different batches or skip reasons cannot deadlock each other. Throughput is therefore per rank.

"Tokens" are the padded counts the backbone computes on: image tokens (image CLS included) and text tokens
(the batch's padded length), per image-text pass (NLVR2 runs two passes per example). Samples/s counts task
examples per second of step time (forward, backward and optimiser step in training; forward in evaluation);
tokens/s counts tokens entering the first layer.

The custom-scalars layout (``Token reduction``: one chart per modality with a line per layer; ``Throughput``)
is written once per TensorBoard writer.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.flop_counter import FlopCounterMode

from pumer_lightning.measure import flop_counter
from pumer_lightning.tasks.outputs import TokenTally, step_tokens

LAYOUT: dict[str, dict[str, list[Any]]] = {
    "Token reduction": {
        "image tokens entering each layer (train)": ["Multiline", [r"^tokens/image/layer_\d+$"]],
        "text tokens entering each layer (train)": ["Multiline", [r"^tokens/text/layer_\d+$"]],
        "image tokens entering each layer (eval)": ["Multiline", [r"^(val|test)/tokens/image/layer_\d+$"]],
        "text tokens entering each layer (eval)": ["Multiline", [r"^(val|test)/tokens/text/layer_\d+$"]],
        "tokens per pass, summed over layers": ["Multiline", [r"^((val|test)/)?tokens/per_pass$"]],
        "GFLOPs per example": ["Multiline", [r"^(val|test)/gflops_per_example$"]],
    },
    "Throughput": {
        "samples/s": ["Multiline", [r"^throughput/\w+_samples_per_sec$"]],
        "tokens/s": ["Multiline", [r"^throughput/\w+_tokens_per_sec$"]],
        "forward time per layer (ms)": ["Multiline", [r"^(val|test)/time/layer_\d+_ms$"]],
    },
}


def tensorboard_writer(trainer: pl.Trainer):
    """The SummaryWriter of the trainer's TensorBoardLogger, or None."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


@rank_zero_only
def add_layout(trainer: pl.Trainer) -> bool:
    """Write the custom-scalars layout once per writer; True when this call wrote it."""
    writer = tensorboard_writer(trainer)
    if writer is None or getattr(writer, "_pumer_layout_written", False):
        return False
    writer.add_custom_scalars(LAYOUT)
    writer._pumer_layout_written = True
    return True


class _LayerTimer:
    """Forward time of each reducible layer, from hooks on the first module each layer calls.

    ViLT: each block starts with ``layernorm_before``; the last ends at the final ``layernorm``. METER: each
    co-attention block starts with its text layer's self-attention query; the last ends at the text pooler. A
    layer's time includes its reducer. CUDA times come from events read once per batch.
    """

    def __init__(self, backbone: torch.nn.Module) -> None:
        family = getattr(backbone, "family", None)
        if family == "vilt":
            starts = [layer.layernorm_before for layer in backbone.encoder.layer]
            end = backbone.layernorm
        elif family == "meter":
            starts = [layer.attention.self.query for layer in backbone.cross_modal_text_layers]
            end = backbone.cross_modal_text_pooler
        else:
            raise ValueError(f"per-layer timing does not know the {family!r} backbone")
        self.num_layers = len(starts)
        self.cuda = next(backbone.parameters()).is_cuda
        self.marks: list[Any] = []
        self.totals = [0.0] * self.num_layers
        self.batches = 0
        self.handles = [m.register_forward_pre_hook(self._mark) for m in [*starts, end]]

    def _mark(self, module: torch.nn.Module, args: Any) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def end_batch(self) -> None:
        """Fold the marks of this batch (one or more passes of num_layers + 1 marks) into the totals."""
        marks, n = self.marks, self.num_layers + 1
        self.marks = []
        if len(marks) < n:
            return
        if self.cuda:
            torch.cuda.synchronize()
        for start in range(0, len(marks) - n + 1, n):
            for i in range(self.num_layers):
                a, b = marks[start + i], marks[start + i + 1]
                self.totals[i] += a.elapsed_time(b) if self.cuda else (b - a) * 1000.0
        self.batches += 1

    def mean_ms(self) -> list[float]:
        return [t / self.batches for t in self.totals] if self.batches else []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class TokenStatsCallback(pl.Callback):
    """Logs tokens per layer, measured FLOPs, throughput and (optionally) per-layer time; see the module doc.

    Args:
        window: training steps per throughput measurement.
        flops: measure forward FLOPs on the first evaluation batch of every epoch (``torch.utils.flop_counter``);
            that batch is left out of the throughput.
        layer_time: time every layer's forward pass during evaluation (hooks; a little overhead).
        skip_first: training steps left out of throughput at the start of each epoch (warm-up, loader start).

    ``last_tokens`` holds the `TokenTally` of the last step it saw (for inspection), ``last`` the last value of
    every tag it logged.
    """

    def __init__(
        self, window: int = 20, flops: bool = True, layer_time: bool = False, skip_first: int = 2
    ) -> None:
        if window < 1:
            raise ValueError(f"TokenStatsCallback.window must be >= 1, got {window}")
        self.window = window
        self.flops = flops
        self.layer_time = layer_time
        self.skip_first = skip_first
        self._t0: float | None = None
        # training steps of this epoch (set here too: a mid-epoch resume skips the epoch start)
        self._seen = 0
        self._train: dict[str, float] = defaultdict(float)
        self._eval: dict[str, Any] = {}
        self._flop_mode: FlopCounterMode | None = None
        self._timer: _LayerTimer | None = None
        self.last: dict[str, float] = {}
        self.last_tokens: TokenTally | None = None

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _log(self, pl_module: pl.LightningModule, name: str, value: float, on_step: bool) -> None:
        self.last[name] = float(value)
        pl_module.log(
            name, float(value), on_step=on_step, on_epoch=not on_step, batch_size=1, sync_dist=False
        )

    def _log_layers(
        self, pl_module: pl.LightningModule, prefix: str, tally: TokenTally, on_step: bool
    ) -> None:
        image, text = tally.mean_image(), tally.mean_text()
        for i, (n_img, n_txt) in enumerate(zip(image, text)):
            self._log(pl_module, f"{prefix}tokens/image/layer_{i:02d}", n_img, on_step)
            self._log(pl_module, f"{prefix}tokens/text/layer_{i:02d}", n_txt, on_step)
        if image:
            self._log(pl_module, f"{prefix}tokens/per_pass", sum(image) + sum(text), on_step)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        add_layout(trainer)

    # ------------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train = defaultdict(float)
        self._seen = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        tally = self.last_tokens = step_tokens(outputs)
        self._sync(pl_module)
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        self._log_layers(pl_module, "", tally, on_step=True)
        self._seen += 1
        if self._seen <= self.skip_first:
            return
        acc = self._train
        acc["time"] += elapsed
        acc["examples"] += tally.examples
        acc["tokens"] += tally.input_tokens
        acc["steps"] += 1
        if acc["steps"] >= self.window:
            self._flush_train(pl_module)

    def _flush_train(self, pl_module: pl.LightningModule, on_step: bool = True) -> None:
        acc = self._train
        if acc["steps"] and acc["time"] > 0:
            self._log(pl_module, "throughput/train_samples_per_sec", acc["examples"] / acc["time"], on_step)
            self._log(pl_module, "throughput/train_tokens_per_sec", acc["tokens"] / acc["time"], on_step)
        self._train = defaultdict(float)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_train(pl_module, on_step=False)  # the epoch's partial window

    # ------------------------------------------------------------------------------------------ evaluation
    def _eval_start(self, pl_module: pl.LightningModule) -> None:
        self._eval = {"tally": TokenTally(), "time": 0.0, "examples": 0, "tokens": 0.0, "flops": None}
        if self.layer_time:
            self._timer = _LayerTimer(pl_module.backbone)

    def _eval_batch_start(self, pl_module: pl.LightningModule, batch_idx: int, dataloader_idx: int) -> None:
        if self.flops and batch_idx == 0 and dataloader_idx == 0:
            self._flop_mode = flop_counter()
            self._flop_mode.__enter__()
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def _eval_batch_end(self, pl_module: pl.LightningModule, outputs: Any) -> None:
        self._sync(pl_module)
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        tally = self.last_tokens = step_tokens(outputs)
        ev = self._eval
        ev["tally"].merge(tally)
        if self._timer is not None:
            self._timer.end_batch()
        if self._flop_mode is not None:
            self._flop_mode.__exit__(None, None, None)
            total = self._flop_mode.get_total_flops()
            self._flop_mode = None
            if tally.examples:
                ev["flops"] = total / tally.examples
            return  # the counted batch ran under the flop counter: not a throughput sample
        ev["time"] += elapsed
        ev["examples"] += tally.examples
        ev["tokens"] += tally.input_tokens

    def _eval_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ev = self._eval
        if not ev:
            return
        self._log_layers(pl_module, f"{stage}/", ev["tally"], on_step=False)
        if ev["flops"] is not None:
            self._log(pl_module, f"{stage}/gflops_per_example", ev["flops"] / 1e9, on_step=False)
        if ev["time"] > 0:
            self._log(
                pl_module, f"throughput/{stage}_samples_per_sec", ev["examples"] / ev["time"], on_step=False
            )
            self._log(
                pl_module, f"throughput/{stage}_tokens_per_sec", ev["tokens"] / ev["time"], on_step=False
            )
        if self._timer is not None:
            for i, ms in enumerate(self._timer.mean_ms()):
                self._log(pl_module, f"{stage}/time/layer_{i:02d}_ms", ms, on_step=False)
            self._timer.remove()
            self._timer = None
        self._eval = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(pl_module)

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_start(pl_module, batch_idx, dataloader_idx)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(pl_module, outputs)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            self._eval = {}
            return
        self._eval_end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(pl_module)

    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_start(pl_module, batch_idx, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_end(pl_module, outputs)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "test")
