"""The shared task LightningModule: backbone + reducer schedule + head + metrics, one step for every stage.

A task subclass says how a batch becomes logits (`compute_logits`), how logits become a loss (`task_loss`,
`distill_loss`), which metrics it keeps and how its predictions are written. Everything else lives here:

* building the backbone from a `BackboneSpec` with the `ReducerSchedule` (``--model.reducer.keep_ratio=0.6``),
* AdamW with three learning-rate groups (backbone / cross-modal / head) and no weight decay on biases and
  normalisation weights, warmup then linear decay sized from ``trainer.estimated_stepping_batches``,
* knowledge distillation from a frozen teacher (a checkpoint, or a frozen copy of the starting weights),
* token bookkeeping: every step returns a `StepOutput` whose ``tokens`` (a `TokenTally` built from the
  backbone's `ReductionTrace`) the callbacks read as Lightning's ``outputs`` in ``on_*_batch_end``.

The path from batch to dashboard is one-way: ``compute_logits`` returns the logits with the tokens of its
backbone passes (`Scored`), the step returns them, the callbacks read them; nothing is written on the module.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypedDict

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from pumer_lightning.measure import register_flop_formulas
from pumer_lightning.models import (
    Backbone,
    BackboneOutput,
    build_backbone,
    build_head,
    load_head_weights,
    preset_family,
)
from pumer_lightning.models.build import preset_image_size
from pumer_lightning.models.checkpoint import check_architecture, load_task_weights
from pumer_lightning.models.graphed import CudaGraphs
from pumer_lightning.reduce import ReducerSchedule, ReductionTrace

log = logging.getLogger("pumer_lightning.tasks")

Stage = Literal["train", "val", "test", "predict"]
STAGES: tuple[str, ...] = ("train", "val", "test")


def stage_key(stage: str) -> str:
    """Key of a stage's metric in an `nn.ModuleDict` (``train`` itself would clash with ``Module.train``)."""
    return f"{stage}_"


@dataclass
class BackboneSpec:
    """Which backbone a task builds, and where its weights and tokenizer are.

    Args:
        preset: ``vilt_b32``, ``meter_b16_288``, ``meter_b16_384`` (full size) or ``vilt_tiny``, ``meter_tiny``.
            It also fixes the data pipeline's image size, resize rule and normalisation (linked by the CLI).
        checkpoint: weights to start from: a checkpoint converted by ``python -m pumer_lightning.models.convert``
            (directory or ``.pt``) or a local HF ViLT directory. None: random initialisation.
        tokenizer: local tokenizer directory the text embeddings were trained with (BERT for ViLT, RoBERTa for
            METER; the shapes tokenizer for the demo). The CLI links it to ``data.tokenizer``.
        vocab_size: rows of the text embedding. None: the tokenizer's size for a random initialisation, the
            checkpoint's table otherwise; a tokenizer with more tokens than the table is an error.
        attn_impl: ``sdpa`` (fused attention kernels) or ``eager`` (explicit softmax).
        reducer_impl: reduction steps ``auto`` (compiled with ``torch.compile`` on CUDA, eager elsewhere),
            ``eager`` or ``compiled``.
        cuda_graphs: on CUDA, run evaluation and prediction forwards as captured CUDA graphs (one per input shape;
            pad texts to a fixed length with ``--data.text_padding max_length`` to need only one or two).
    """

    preset: str = "vilt_tiny"
    checkpoint: str | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    attn_impl: Literal["sdpa", "eager"] = "sdpa"
    reducer_impl: Literal["auto", "eager", "compiled"] = "auto"
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        # jsonargparse 4.53 hands ``--model.backbone.checkpoint=null`` to a dataclass inside a subclass's init_args
        # as the string "None"; read it as intended.
        if self.checkpoint in ("None", "null", ""):
            self.checkpoint = None
        if self.tokenizer in ("None", "null", ""):
            self.tokenizer = None
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"--model.backbone.vocab_size must be >= 1, got {self.vocab_size}")

    @property
    def family(self) -> Literal["vilt", "meter"]:
        return preset_family(self.preset)

    @property
    def image_size(self) -> int:
        return preset_image_size(self.preset)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (PuMer's recipe by default: docs/experiments.md#training-recipe).

    Args:
        lr: base learning rate (the backbone group's).
        lr_mult_head: multiplier for the task head (PuMer's ``lr_mult``: 10 for ViLT, 50 or 10 for METER).
        lr_mult_cross_modal: multiplier for METER's ``cross_modal_*`` parameters (5 in PuMer; ViLT has none).
        weight_decay: decoupled weight decay; never applied to biases and normalisation weights.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_ratio: warmup length as a fraction of the total optimiser steps.
        warmup_steps: warmup length in steps; overrides ``warmup_ratio`` when set.
        schedule: after warmup: ``linear`` decay to ``end_lr_ratio * lr``, ``cosine`` decay, or ``constant``.
        end_lr_ratio: final learning rate as a fraction of the peak.
    """

    lr: float = 1e-4
    lr_mult_head: float = 10.0
    lr_mult_cross_modal: float = 1.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    end_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--model.optim.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--model.optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--model.optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"--model.optim.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen, unreduced teacher of the same architecture
    (docs/official_code_differences.md#b16).

    Args:
        teacher: ``initial`` (a frozen copy of the student's starting weights, i.e. the backbone checkpoint and
            head as loaded, without reducers), a Lightning ``.ckpt`` written by this framework for the same task,
            or a converted checkpoint (``pumer_config.json`` directory or ``.pt``) holding this task's head. A path
            that does not exist is an error.
        weight: scale of the distillation term (PuMer's ``logits_loss_scale``).
        task_weight: scale of the task loss (PuMer's ``task_loss_scale``).
        temperature: softening temperature; the term is multiplied by ``temperature ** 2``.
    """

    teacher: str = "initial"
    weight: float = 1.0
    task_weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"--model.distill.temperature must be > 0, got {self.temperature}")
        if self.weight < 0 or self.task_weight < 0:
            raise ValueError("--model.distill.weight and --model.distill.task_weight must be >= 0")


@dataclass
class TokenTally:
    """Tokens the backbone processed in one step: sums over the rows (image-text pairs) of every pass.

    ``image[i]`` / ``text[i]``: image / text tokens entering layer ``i``, summed over rows; ``rows``: image-text
    pairs that went through the backbone (NLVR2: two per example; retrieval: every scored pair).
    ``examples``: the units throughput counts: the batch's task examples, except in retrieval evaluation, where
    one example is one scored image-text pair (``examples == rows``). Plain Python numbers only (no tensors).
    """

    examples: int = 0
    rows: int = 0
    image: list[float] = field(default_factory=list)
    text: list[float] = field(default_factory=list)

    def add(self, trace: ReductionTrace, rows: int) -> None:
        if not self.image:
            self.image = [0.0] * len(trace.image_tokens)
            self.text = [0.0] * len(trace.text_tokens)
        for i, (n_img, n_txt) in enumerate(zip(trace.image_tokens, trace.text_tokens)):
            self.image[i] += n_img * rows
            self.text[i] += n_txt * rows
        self.rows += rows

    def merge(self, other: TokenTally) -> None:
        if not other.rows:
            self.examples += other.examples
            return
        if not self.image:
            self.image = [0.0] * len(other.image)
            self.text = [0.0] * len(other.text)
        self.image = [a + b for a, b in zip(self.image, other.image)]
        self.text = [a + b for a, b in zip(self.text, other.text)]
        self.rows += other.rows
        self.examples += other.examples

    def mean_image(self) -> list[float]:
        return [v / self.rows for v in self.image] if self.rows else []

    def mean_text(self) -> list[float]:
        return [v / self.rows for v in self.text] if self.rows else []

    @property
    def input_tokens(self) -> float:
        """Tokens entering the first layer, summed over rows (what tokens/s counts)."""
        return (self.image[0] + self.text[0]) if self.image else 0.0


class Scored(NamedTuple):
    """What `VLTask.compute_logits` returns: the logits and the tokens its backbone passes processed."""

    logits: Any
    tokens: TokenTally


class StepOutput(TypedDict, total=False):
    """What ``training_step``, ``validation_step`` and ``test_step`` return; callbacks receive it as ``outputs``
    in ``on_train_batch_end`` / ``on_validation_batch_end`` / ``on_test_batch_end``.

    ``loss``: the step's loss (what training back-propagates; absent or None for an unlabelled batch).
    ``tokens``: the tokens the model's own backbone processed in the step (a teacher's passes are not counted),
    with ``examples`` set.
    """

    loss: Tensor | None
    tokens: TokenTally


def step_tokens(outputs: Any) -> TokenTally:
    """The `TokenTally` of a step's ``outputs`` (a `StepOutput`); a clear error for a module returning none."""
    tokens = outputs.get("tokens") if isinstance(outputs, dict) else None
    if not isinstance(tokens, TokenTally):
        raise TypeError(
            "the step returned no token tally: the module's training/validation/test step must return a "
            f"StepOutput dict with a 'tokens' TokenTally (pumer_lightning.tasks.VLTask does), got "
            f"{type(outputs).__name__}"
        )
    return tokens


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.RMSNorm)
_CROSS_MODAL = re.compile(r"(^|\.)cross_modal")


def _text_embedding_rows(backbone: nn.Module) -> int | None:
    """Rows of the backbone's word-embedding table (ViLT and METER layouts)."""
    for name, module in backbone.named_modules():
        if name.endswith("word_embeddings") and isinstance(module, nn.Embedding):
            return module.num_embeddings
    return None


def no_decay_names(module: nn.Module) -> set[str]:
    """Parameter names exempt from weight decay: every bias and every weight of a normalisation layer."""
    names = set()
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or isinstance(mod, _NORM_TYPES):
                names.add(full)
    return names


def warmup_decay(
    step: int, total: int, warmup: int, schedule: str = "linear", end_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier at optimiser step ``step``: linear warmup, then the chosen decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        return end_ratio + (1.0 - end_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return end_ratio + (1.0 - end_ratio) * (1.0 - progress)


class VLTask(pl.LightningModule):
    """Base class of the task modules; use `VQATask`, `NLVR2Task`, `SNLIVETask` or `RetrievalTask`.

    Args:
        backbone: which backbone to build and where its weights and tokenizer are.
        reducer: the PuMer schedule (block ids are the backbone's own 0-based indices). The unreduced baseline
            is ``--model.reducer.layers=[]``.
        optim: optimiser and learning-rate schedule.
        distill: knowledge distillation from a frozen teacher; None (default) trains on the task loss only.
        predictions_dir: where ``test`` and ``predict`` write predictions; default ``<log_dir>/predictions``.
    """

    task_name: str = ""
    num_token_types: int = 2
    #: Images per example, one backbone pass each (NLVR2: 2); see `compute_logits`.
    images_per_example: int = 1

    def __init__(
        self,
        backbone: BackboneSpec = BackboneSpec(),  # noqa: B008 (never mutated)
        reducer: ReducerSchedule = ReducerSchedule(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        distill: DistillConfig | None = None,
        predictions_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = backbone if backbone is not None else BackboneSpec()
        self.optim = optim if optim is not None else OptimConfig()
        self.distill = distill
        self.predictions_dir = predictions_dir
        self.backbone: Backbone = self._build_backbone(reducer if reducer is not None else ReducerSchedule())
        self.head = self.build_head()
        self.load_initial_head()
        self.teacher: nn.ModuleDict | None = self._build_teacher() if distill is not None else None
        self.build_metrics()
        self.cuda_graphs = CudaGraphs()
        self.replay_graphs = True  # False while `forward` runs eagerly (see there)
        register_flop_formulas()  # Lightning's model summary then counts the CPU attention kernel too
        self._predictions: list[dict[str, Any]] = []
        self.predictions_path: Path | None = None

    # ------------------------------------------------------------------------------------------ construction
    def _build_backbone(self, reducer: ReducerSchedule | None) -> Backbone:
        spec = self.spec
        family = spec.family  # validates the preset name
        if spec.checkpoint is not None and not Path(spec.checkpoint).exists():
            raise FileNotFoundError(
                f"--model.backbone.checkpoint {spec.checkpoint} does not exist. Convert the original {family} "
                f"weights first: python -m pumer_lightning.models.convert {family} <original.ckpt> "
                f"{spec.checkpoint}"
                + (" (or point it at a local HF ViLT directory)" if family == "vilt" else "")
            )
        tokens = self._tokenizer_size()
        vocab = spec.vocab_size if spec.vocab_size is not None or spec.checkpoint else tokens
        backbone = build_backbone(
            spec.preset,
            spec.checkpoint,
            num_token_types=self.num_token_types,
            vocab_size=vocab,
            reducer=reducer,
            attn_impl=spec.attn_impl,
            reducer_impl=spec.reducer_impl,
        )
        rows = _text_embedding_rows(backbone)
        if tokens is not None and rows is not None and tokens > rows:
            raise ValueError(
                f"--model.backbone.tokenizer {spec.tokenizer} has {tokens} tokens but the {spec.preset} text "
                f"embedding has {rows} rows{' (from ' + spec.checkpoint + ')' if spec.checkpoint else ''}; use the "
                "tokenizer the weights were trained with"
            )
        return backbone

    def _tokenizer_size(self) -> int | None:
        """``len(tokenizer)`` of ``backbone.tokenizer`` (None when no tokenizer is given)."""
        if self.spec.tokenizer is None:
            return None
        if not hasattr(self, "_tokens"):
            from pumer_lightning.data import load_tokenizer

            self._tokens = len(load_tokenizer(self.spec.tokenizer))
        return self._tokens

    def build_head(self) -> nn.Module:
        return build_head(self.task_name, self.backbone.hidden_size, width=self.backbone.head_width)

    def load_initial_head(self) -> None:
        """Start from the checkpoint's head for this task when it has one (e.g. an HF VQA model)."""
        if self.spec.checkpoint is None:
            return
        from pumer_lightning.models import read_checkpoint

        ckpt = read_checkpoint(self.spec.checkpoint)
        if ckpt.head and ckpt.task == self.task_name:
            load_head_weights(self.head, ckpt, self.task_name)
            log.info("loaded the %s head of %s", self.task_name, ckpt.path)

    def _build_teacher(self) -> nn.ModuleDict:
        assert self.distill is not None
        source = self.distill.teacher
        if source == "initial":
            teacher = nn.ModuleDict(
                {"backbone": copy.deepcopy(self.backbone), "head": copy.deepcopy(self.head)}
            )
            teacher["backbone"].reducer = None
        else:
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(
                    f"--model.distill.teacher {source} does not exist. Give a fine-tuned checkpoint of the "
                    f"unreduced model (train one with --model.reducer.layers=[]), or 'initial' for a frozen copy "
                    f"of the starting weights; distillation is never skipped silently."
                )
            teacher = nn.ModuleDict({"backbone": self._build_backbone(None), "head": self.build_head()})
            if path.suffix == ".ckpt":  # the one loader: architecture checked, then strict
                what = f"--model.distill.teacher {source}"
                load_task_weights(teacher, path, what, f"preset {self.spec.preset!r}")
            else:
                teacher["backbone"] = build_backbone(
                    self.spec.preset,
                    source,
                    num_token_types=self.num_token_types,
                    vocab_size=self.spec.vocab_size,
                    attn_impl=self.spec.attn_impl,
                    reducer_impl=self.spec.reducer_impl,
                )
                load_head_weights(teacher["head"], source, self.task_name)
        teacher.requires_grad_(False)
        teacher.eval()
        return teacher

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the backbone's architecture: the hyper-parameters name only its preset, whose definition may
        change after the checkpoint is saved."""
        checkpoint["backbone_architecture"] = self.backbone.architecture

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        check_architecture(
            checkpoint.get("backbone_architecture"), self.backbone.architecture,
            f"Lightning checkpoint {path}" if path else "the Lightning checkpoint",
            f"--model.backbone.preset {self.spec.preset}",
        )  # fmt: skip

    def train(self, mode: bool = True) -> VLTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never leaves eval mode (no dropout)
        return self

    # ------------------------------------------------------------------------------------------ task interface
    def compute_logits(self, batch: dict[str, Any], backbone: Backbone, head: nn.Module) -> Scored:
        """Logits of a batch from ``backbone`` and ``head`` (the student's or the teacher's), with the tokens the
        backbone passes processed (``examples`` left for the step to set).

        Default (VQA, SNLI-VE, NLVR2): one pass per image of the example, image ``i`` with modality type ``i + 1``
        and the example's text; the pooled features are concatenated, then the head.
        """
        pixels = batch["pixel_values"]  # (B, images_per_example, 3, H, W); (B, 3, H, W) for one image
        n = self.images_per_example
        if n == 1:
            images = [pixels[:, 0] if pixels.dim() == 5 else pixels]
        elif pixels.dim() == 5 and pixels.shape[1] == n:
            images = list(pixels.unbind(1))
        else:
            raise ValueError(
                f"{self.task_name.upper()} needs pixel_values of shape (B, {n}, 3, H, W), "
                f"got {tuple(pixels.shape)}"
            )
        tokens = TokenTally()
        pooled = []
        for index, image in enumerate(images):
            out = self.encode(backbone, image, batch, index)
            tokens.add(out.trace, image.shape[0])
            pooled.append(out.pooled)
        return Scored(head(pooled[0] if n == 1 else torch.cat(pooled, dim=-1)), tokens)

    def build_metrics(self) -> None:
        """Create the metric modules (one set per stage)."""

    def task_loss(self, logits: Any, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def distill_loss(self, student: Any, teacher: Any) -> Tensor:
        """Softmax KL(teacher || student) at temperature T, times T^2 (classification tasks)."""
        t = self.distill.temperature if self.distill is not None else 1.0
        log_p_s = torch.log_softmax(student.float() / t, dim=-1)
        log_p_t = torch.log_softmax(teacher.float() / t, dim=-1)
        kl = torch.nn.functional.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return kl * t * t

    def update_metrics(self, stage: str, logits: Any, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_epoch_metrics(self, stage: str) -> None:
        """Log (and reset) the epoch-level metrics of ``stage``."""
        raise NotImplementedError

    def has_updates(self, metric: Any) -> bool:
        """Whether to compute ``metric`` now. Under DDP every rank computes (``compute`` is a collective), even
        one that saw no batch of the split; alone, a metric without updates is skipped."""
        return bool(metric.update_count) or self.trainer.world_size > 1

    def prediction_rows(self, logits: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return []

    def write_predictions(self, rows: list[dict[str, Any]], directory: Path, stage: str) -> Path | None:
        return None

    # ------------------------------------------------------------------------------------------ helpers
    def encode(
        self, backbone: Backbone, pixel_values: Tensor, batch: dict[str, Any], image_index: int,
        input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
    ) -> BackboneOutput:  # fmt: skip
        """One backbone pass (replayed from a CUDA graph in CUDA inference); its ``trace`` holds the token
        counts."""
        ids = batch["input_ids"] if input_ids is None else input_ids
        mask = batch["attention_mask"] if attention_mask is None else attention_mask
        if self.spec.cuda_graphs and self.replay_graphs and CudaGraphs.applies(backbone, pixel_values):
            return self.cuda_graphs(backbone, pixel_values, ids, mask, image_index)
        return backbone(pixel_values, ids, mask, image_index=image_index)

    @staticmethod
    def batch_size_of(batch: dict[str, Any]) -> int:
        return int(batch["pixel_values"].shape[0])

    @staticmethod
    def group_names(batch: dict[str, Any]) -> list[str | None]:
        """Per-example group for per-type metrics: ``statement_type`` (shapes) or ``answer_type`` (VQAv2)."""
        out = []
        for m in batch.get("meta") or []:
            out.append(m.get("statement_type", m.get("answer_type")) if isinstance(m, dict) else None)
        return out

    # ------------------------------------------------------------------------------------------ steps
    def forward(self, batch: dict[str, Any], cuda_graphs: bool = True) -> Any:
        """The logits of ``batch``; ``cuda_graphs=False`` runs every backbone pass eagerly even where a captured
        CUDA graph would replay it (a replay dispatches no operator, so a FLOP counter would see nothing)."""
        self.replay_graphs, previous = cuda_graphs, self.replay_graphs
        try:
            return self.compute_logits(batch, self.backbone, self.head).logits
        finally:
            self.replay_graphs = previous

    @property
    def example_input_array(self) -> tuple[dict[str, Tensor], bool]:
        """``forward``'s arguments for one example (`example_batch`), run eagerly: what Lightning's model summary
        forwards to fill its ``FLOPs`` column and total (``Total FLOPs: 0`` without it)."""
        return self.example_batch(), False

    def example_batch(self, batch_size: int = 1) -> dict[str, Tensor]:
        """A batch of ``batch_size`` examples shaped as this task's ``compute_logits`` reads it: the backbone's image
        size, ``images_per_example`` images each, texts of the backbone's ``max_text_len`` real tokens."""
        size, length = self.backbone.image_size, self.backbone.max_text_len
        ids = torch.full((batch_size, length), self.backbone.pad_token_id + 1, dtype=torch.long)
        return {
            "pixel_values": torch.zeros(batch_size, self.images_per_example, 3, size, size),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
        }

    def shared_step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        """The step of every stage: logits, loss (if labelled), distillation (training), metrics, predictions;
        returns the loss and the step's tokens."""
        logits, tokens = self.compute_logits(batch, self.backbone, self.head)
        bs = self.batch_size_of(batch)
        tokens.examples = bs
        loss = None
        if "labels" in batch:
            loss = self.task_loss(logits, batch)
            if stage == "train" and self.teacher is not None:
                assert self.distill is not None
                with torch.no_grad():
                    teacher = self.compute_logits(batch, self.teacher["backbone"], self.teacher["head"])
                kd = self.distill_loss(logits, teacher.logits)
                self.log("train/loss_task", loss, batch_size=bs)
                self.log("train/loss_distill", kd, batch_size=bs)
                loss = self.distill.task_weight * loss + self.distill.weight * kd
            train = stage == "train"  # per step in training, per epoch in evaluation
            self.log(
                f"{stage}/loss", loss, batch_size=bs, prog_bar=train, on_step=train, on_epoch=not train,
                sync_dist=not train,  # evaluation: the mean over every rank's examples
            )  # fmt: skip
            self.update_metrics(stage, logits, batch)
        if stage in ("test", "predict"):
            self._predictions.extend(self.prediction_rows(logits, batch))
        return {"loss": loss, "tokens": tokens}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        out = self.shared_step(batch, "train")
        if out["loss"] is None:
            raise ValueError("training batches must carry labels (is the train split unlabelled?)")
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        return self.shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        return self.shared_step(batch, "test")

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        logits = self.compute_logits(batch, self.backbone, self.head).logits
        rows = self.prediction_rows(logits, batch)
        self._predictions.extend(rows)
        return rows

    # ------------------------------------------------------------------------------------------ epoch ends
    def on_train_epoch_end(self) -> None:
        self.log_epoch_metrics("train")

    def on_validation_epoch_start(self) -> None:
        self.skips_begin("val")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")
        self.skips_end("val")

    def on_test_epoch_start(self) -> None:
        self._predictions = []
        self.skips_begin("test")

    def on_predict_epoch_start(self) -> None:
        self._predictions = []
        self.skips_begin("predict")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")
        self._flush_predictions("test")

    def on_predict_epoch_end(self) -> None:
        self._flush_predictions("predict")

    def _flush_predictions(self, stage: str) -> None:
        skipped = self.skips_end(stage)  # a collective under DDP: before anything that may return early
        rows = self._predictions
        self._predictions = []
        if self.trainer.world_size > 1:
            gathered: list[list[dict[str, Any]]] = [None] * self.trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not rows and not skipped:
            return
        if stage == "test" and rows:
            for name, value in self.prediction_metrics(rows).items():
                self.log(f"test/{name}", value, sync_dist=True)  # same value on every rank
        directory = self.output_dir("predictions")  # on every rank: log_dir is a broadcast under DDP
        if not self.trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        path = self.write_predictions(rows, directory, stage)
        if path is not None:
            self.write_skip_summary(path, stage, len(rows), skipped)
            log.info(
                "%s predictions: %s (%d, %d example(s) skipped)",
                stage,
                path,
                len(rows),
                sum(skipped.values()),
            )
            self.predictions_path = path

    # ------------------------------------------------------------------------------------------ skipped examples
    def _stage_split(self, stage: str) -> str | None:
        dm = getattr(self.trainer, "datamodule", None)
        attr = {"val": "val_split", "test": "test_split", "predict": "predict_split"}.get(stage)
        return getattr(dm, attr, None) if dm is not None and attr else None

    def skips_begin(self, stage: str) -> None:
        """Remember the data module's skip counts when an evaluation pass of ``stage`` starts."""
        dm = getattr(self.trainer, "datamodule", None)
        marks = self.__dict__.setdefault("_skip_marks", {})
        marks[stage] = dict(getattr(dm, "skipped", None) or {})

    def skips_end(self, stage: str) -> dict[str, int]:
        """Examples of the stage's split skipped during this pass, ``{reason: count}`` summed over ranks.

        Call it on every rank (it gathers under DDP). The counts are logged as a warning; ``validate`` also logs
        them as ``data/skipped/<split>/<reason>`` (``fit`` and ``test`` log them through ``TokenStatsCallback``;
        ``predict`` cannot log metrics: its counts go into the prediction file's ``.skipped.json``).
        """
        dm = getattr(self.trainer, "datamodule", None)
        split = self._stage_split(stage)
        before = self.__dict__.get("_skip_marks", {}).pop(stage, {})
        now = dict(getattr(dm, "skipped", None) or {})
        prefix = f"{split}/"
        delta = {
            k[len(prefix) :]: n - before.get(k, 0)
            for k, n in now.items()
            if split is not None and k.startswith(prefix) and n > before.get(k, 0)
        }
        if (
            self.trainer.world_size > 1
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            parts: list[dict[str, int]] = [None] * self.trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(parts, delta)
            delta = {}
            for part in parts:
                for reason, n in part.items():
                    delta[reason] = delta.get(reason, 0) + n
        if self.trainer.sanity_checking:
            return delta
        if delta and self.trainer.is_global_zero:
            log.warning("[%s] %d example(s) of split %r skipped, by reason: %s", stage, sum(delta.values()), split,
                        dict(sorted(delta.items())))  # fmt: skip
        if stage == "val" and getattr(self.trainer.state, "fn", None) == "validate":
            for reason, n in sorted(delta.items()):
                self.log(f"data/skipped/{split}/{reason}", float(n), batch_size=1, sync_dist=False)
        return delta

    def write_skip_summary(self, path: Path, stage: str, predictions: int, skipped: dict[str, int]) -> Path:
        """``<predictions file>.skipped.json`` next to a prediction file: how many examples of the split it
        covers and how many were skipped, by reason (the prediction formats themselves have no room for it)."""
        out = path.with_name(path.name + ".skipped.json")
        summary = {
            "stage": stage,
            "split": self._stage_split(stage),
            "predictions": predictions,
            "skipped_total": sum(skipped.values()),
            "skipped": dict(sorted(skipped.items())),
        }
        out.write_text(json.dumps(summary, indent=1) + "\n")
        return out

    def output_dir(self, name: str) -> Path:
        """``predictions_dir`` or ``<log_dir>/<name>``. Call it on every rank (``trainer.log_dir`` is a collective)."""
        return Path(self.predictions_dir or Path(self.trainer.log_dir or ".") / name)

    def prediction_metrics(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics that need every prediction of the split at once (NLVR2 consistency); all ranks see all rows."""
        return {}

    # ------------------------------------------------------------------------------------------ setup checks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        task = getattr(dm, "task", None)
        if task is not None and task != self.task_name:
            raise ValueError(
                f"data.task is {task!r} but the model is a {type(self).__name__} ({self.task_name!r}); set "
                f"--data.task={self.task_name} or choose the matching model class"
            )

    # ------------------------------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: (backbone | cross-modal | head) x (decay | no decay); frozen parameters left out."""
        cfg = self.optim
        exempt = {f"backbone.{n}" for n in no_decay_names(self.backbone)}
        exempt |= {f"head.{n}" for n in no_decay_names(self.head)}
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad or name.startswith("teacher."):
                continue
            if name.startswith("head."):
                part = "head"
            elif _CROSS_MODAL.search(name):
                part = "cross_modal"
            else:
                part = "backbone"
            groups.setdefault((part, name not in exempt), []).append(param)
        mult = {"backbone": 1.0, "cross_modal": cfg.lr_mult_cross_modal, "head": cfg.lr_mult_head}
        out = []
        for (part, decay), params in sorted(groups.items()):
            out.append(
                {
                    "params": params,
                    "lr": cfg.lr * mult[part],
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                    "name": f"{part}{'' if decay else '/no_decay'}",
                }
            )
        return out

    def total_steps(self) -> int:
        """Optimiser steps of the whole run, from the data module's known epoch length (or ``max_steps``)."""
        total = int(self.trainer.estimated_stepping_batches)
        if total <= 0 or total == float("inf"):
            raise ValueError(
                "cannot size the learning-rate schedule: the number of training steps is unknown; set "
                "--trainer.max_steps or --trainer.max_epochs"
            )
        return total

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim
        optimizer = torch.optim.AdamW(self.param_groups(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        total = self.total_steps()
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total))
        warmup = min(warmup, max(total - 1, 0))

        def factor(step: int) -> float:
            return warmup_decay(step, total, warmup, cfg.schedule, cfg.end_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
