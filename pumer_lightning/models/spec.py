"""A task's model from its `BackboneSpec`: the backbone, the head's starting weights and the distillation teacher.

`build_backbone` builds a preset with optional weights; this module is what a task module asks for on top of it:
the spec it is configured with (``--model.backbone.*``), the checks that need the task's tokenizer, the checkpoint's
own head when it holds the task's, and the frozen teacher of knowledge distillation.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from pumer_lightning.reduce import ReducerSchedule

from .base import Backbone
from .build import build_backbone, preset_family, preset_image_size
from .checkpoint import load_head_weights, load_task_weights, read_checkpoint

log = logging.getLogger("pumer_lightning.tasks")


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


def build_from_spec(
    spec: BackboneSpec,
    *,
    num_token_types: int,
    reducer: ReducerSchedule | None,
    tokenizer_size: int | None,
) -> Backbone:
    """The backbone ``spec`` describes, with ``reducer``.

    ``tokenizer_size`` (``len`` of the spec's tokenizer, None without one) sizes the text embedding of a random
    initialisation and must fit the table of a checkpoint's; a missing checkpoint names the command that makes it.
    """
    family = spec.family  # validates the preset name
    if spec.checkpoint is not None and not Path(spec.checkpoint).exists():
        hf = " (or point it at a local HF ViLT directory)" if family == "vilt" else ""
        raise FileNotFoundError(
            f"--model.backbone.checkpoint {spec.checkpoint} does not exist. Convert the original {family} "
            f"weights first: python -m pumer_lightning.models.convert {family} <original.ckpt> "
            f"{spec.checkpoint}{hf}"
        )
    vocab = spec.vocab_size if spec.vocab_size is not None or spec.checkpoint else tokenizer_size
    backbone = build_backbone(
        spec.preset,
        spec.checkpoint,
        num_token_types=num_token_types,
        vocab_size=vocab,
        reducer=reducer,
        attn_impl=spec.attn_impl,
        reducer_impl=spec.reducer_impl,
    )
    rows = text_embedding_rows(backbone)
    if tokenizer_size is not None and rows is not None and tokenizer_size > rows:
        source = f" (from {spec.checkpoint})" if spec.checkpoint else ""
        raise ValueError(
            f"--model.backbone.tokenizer {spec.tokenizer} has {tokenizer_size} tokens but the {spec.preset} text "
            f"embedding has {rows} rows{source}; use the tokenizer the weights were trained with"
        )
    return backbone


def text_embedding_rows(backbone: nn.Module) -> int | None:
    """Rows of the backbone's word-embedding table (ViLT and METER layouts)."""
    for name, module in backbone.named_modules():
        if name.endswith("word_embeddings") and isinstance(module, nn.Embedding):
            return module.num_embeddings
    return None


def load_initial_head(head: nn.Module, spec: BackboneSpec, task: str) -> None:
    """Start ``head`` from the spec's checkpoint when it holds a ``task`` head (e.g. an HF VQA model)."""
    if spec.checkpoint is None:
        return
    ckpt = read_checkpoint(spec.checkpoint)
    if ckpt.head and ckpt.task == task:
        load_head_weights(head, ckpt, task)
        log.info("loaded the %s head of %s", task, ckpt.path)


def build_teacher(
    source: str,
    spec: BackboneSpec,
    *,
    backbone: Backbone,
    head: nn.Module,
    new_head: Callable[[], nn.Module],
    task: str,
    tokenizer_size: int | None,
) -> nn.ModuleDict:
    """The frozen, unreduced ``{"backbone", "head"}`` a student of ``backbone`` + ``head`` distils from.

    ``source``: ``initial`` (a copy of the student as built, without reducers), a Lightning ``.ckpt`` of the same
    task and architecture (the one loader: architecture checked, then strict), or a converted checkpoint holding
    the ``task`` head. ``new_head`` makes an untrained head of the student's shape.
    """
    if source == "initial":
        teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(head)})
        teacher["backbone"].reducer = None
    else:
        teacher = _teacher_from(source, spec, backbone.num_token_types, new_head, task, tokenizer_size)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def _teacher_from(
    source: str,
    spec: BackboneSpec,
    num_token_types: int,
    new_head: Callable[[], nn.Module],
    task: str,
    tokenizer_size: int | None,
) -> nn.ModuleDict:
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"--model.distill.teacher {source} does not exist. Give a fine-tuned checkpoint of the "
            f"unreduced model (train one with --model.reducer.layers=[]), or 'initial' for a frozen copy "
            f"of the starting weights; distillation is never skipped silently."
        )
    built = build_from_spec(
        spec, num_token_types=num_token_types, reducer=None, tokenizer_size=tokenizer_size
    )
    teacher = nn.ModuleDict({"backbone": built, "head": new_head()})
    if path.suffix == ".ckpt":
        what = f"--model.distill.teacher {source}"
        load_task_weights(teacher, path, what, f"preset {spec.preset!r}")
        return teacher
    teacher["backbone"] = build_backbone(
        spec.preset,
        source,
        num_token_types=num_token_types,
        vocab_size=spec.vocab_size,
        attn_impl=spec.attn_impl,
        reducer_impl=spec.reducer_impl,
    )
    load_head_weights(teacher["head"], source, task)
    return teacher
