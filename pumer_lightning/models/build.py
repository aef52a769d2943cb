"""Named backbone presets and `build_backbone`, the one entry point tasks use."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import ViltConfig

from pumer_lightning.reduce import ReducerSchedule

from .attention import AttnImpl, check_attn_impl
from .base import Backbone, ReducerImpl, check_reducer_impl
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    check_architecture,
    load_strict,
    read_checkpoint,
    resize_position_table,
)
from .meter import MeterBackbone, MeterConfig
from .vilt import ViltBackbone, vilt_config

logger = logging.getLogger(__name__)

# ViLT-B/32 as released (dandelin/vilt-b32-*): 384 px, patch 32, BERT-base text embeddings with 40 positions.
_VILT_PRESETS: dict[str, dict[str, Any]] = {
    "vilt_b32": {},
    "vilt_tiny": dict(
        hidden_size=32,
        num_layers=4,
        num_heads=2,
        intermediate_size=64,
        image_size=96,
        patch_size=16,
        vocab_size=1000,
    ),
    # The demo's model (make exp): wide enough that a reduction step costs less than the tokens it removes save
    # (at hidden 32 the step's n x n matching costs about what it saves on a CPU).
    "vilt_mini": dict(
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        intermediate_size=256,
        image_size=96,
        patch_size=16,
        vocab_size=1000,
    ),
    # The accuracy study's model (make study): big enough to learn the shapes statements in CPU-minutes.
    "vilt_small": dict(
        hidden_size=96,
        num_layers=4,
        num_heads=4,
        intermediate_size=384,
        image_size=96,
        patch_size=16,
        vocab_size=1000,
    ),
}
# METER-CLIP16-RoBERTa: 11-block CLIP ViT-B/16, RoBERTa-base, 6 co-attention blocks.
_METER_PRESETS: dict[str, MeterConfig] = {
    "meter_b16_288": MeterConfig(image_size=288),
    "meter_b16_384": MeterConfig(image_size=384),
    "meter_tiny": MeterConfig(
        image_size=96,
        patch_size=16,
        vision_hidden=32,
        vision_layers=2,
        vision_heads=2,
        vision_intermediate=64,
        vocab_size=1000,
        text_hidden=32,
        text_layers=2,
        text_heads=2,
        text_intermediate=64,
        text_max_positions=42,
        hidden=32,
        cross_layers=3,
        cross_heads=2,
        cross_intermediate=64,
    ),
}
PRESETS: tuple[str, ...] = (*_VILT_PRESETS, *_METER_PRESETS)

# Keys whose shapes follow build options rather than the architecture.
_KEYS = {
    "vilt": {
        "types": "embeddings.token_type_embeddings.weight",
        "vocab": "embeddings.text_embeddings.word_embeddings.weight",
        "positions": "embeddings.position_embeddings",
    },
    "meter": {
        "types": "token_type_embeddings.weight",
        "vocab": "text_transformer.embeddings.word_embeddings.weight",
        "positions": "vit_model.embeddings.position_embedding.weight",
    },
}
_VILT_CORE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")


def preset_family(preset: str) -> Literal["vilt", "meter"]:
    if preset in _VILT_PRESETS:
        return "vilt"
    if preset in _METER_PRESETS:
        return "meter"
    raise ValueError(f"unknown backbone preset {preset!r}; choose one of {list(PRESETS)}")


def build_backbone(
    preset: str,
    checkpoint: str | Path | None = None,
    *,
    num_token_types: int = 2,
    vocab_size: int | None = None,
    reducer: ReducerSchedule | None = None,
    attn_impl: Literal["sdpa", "eager"] = "sdpa",
    reducer_impl: Literal["auto", "eager", "compiled"] = "auto",
) -> Backbone:
    """Build a backbone from a preset, optionally with weights.

    Args:
        preset: ``vilt_b32``, ``meter_b16_288``, ``meter_b16_384`` (full size) or ``vilt_tiny``, ``meter_tiny``.
        checkpoint: a local HF ViLT directory or a checkpoint converted by ``pumer_lightning.models.convert``
            (directory or ``.pt`` file). Loaded strictly; a mismatch names every missing/unexpected key.
            Position embeddings are resized to the preset's image size when they differ (bicubic for METER
            as its converter does, bilinear for ViLT as its runtime does; the CLS row is kept).
        num_token_types: rows of the modality type embedding: 2, or 3 for NLVR2's two images. A 2-row checkpoint
            loaded with 3 gets row 2 copied from row 1 (the originals' NLVR2 initialisation).
        vocab_size: text vocabulary size; default: the checkpoint's, else the preset's.
        reducer: reducer schedule; its block ids are checked against the backbone's depth.
        attn_impl: ``"sdpa"`` (fused kernels) or ``"eager"`` (explicit softmax).
        reducer_impl: ``"auto"`` (compiled reduction steps on CUDA, eager elsewhere), ``"eager"`` or
            ``"compiled"`` (one ``torch.compile`` region per reduction plan).
    """
    family = preset_family(preset)
    check_attn_impl(attn_impl)
    check_reducer_impl(reducer_impl)
    if num_token_types < 2:
        raise ValueError(f"num_token_types must be at least 2 (text + one image), got {num_token_types}")
    ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.family != family:
        raise CheckpointError(
            f"{ckpt.path} holds a {ckpt.family} backbone, but preset {preset!r} is {family}"
        )
    keys = _KEYS[family]
    state = dict(ckpt.backbone) if ckpt is not None else None
    if state is not None:
        for key in keys.values():
            if key not in state:
                raise CheckpointError(f"{ckpt.path}: backbone weights lack {key}")
        vocab_size = _resolve_vocab(vocab_size, state[keys["vocab"]].shape[0], ckpt.path)
        state[keys["types"]] = _resolve_types(state[keys["types"]], num_token_types, ckpt.path)

    hf_config = _vilt_config_for(preset, ckpt) if family == "vilt" else None
    model = new_backbone(
        preset,
        num_token_types=num_token_types,
        vocab_size=vocab_size,
        reducer=reducer,
        attn_impl=attn_impl,
        reducer_impl=reducer_impl,
        vilt_config_override=hf_config,
    )
    if state is not None:
        grid = model.image_size // model.patch_size
        vilt = family == "vilt"
        table = state[keys["positions"]][0] if vilt else state[keys["positions"]]  # (1 + g*g, C)
        if table.shape[0] != grid * grid + 1:
            # resized as the originals do: ViLT bilinearly at run time, METER bicubically at load time
            mode, corners = ("bilinear", True) if vilt else ("bicubic", False)
            logger.info("%s: resizing position embeddings to a %dx%d grid (%s)", ckpt.path, grid, grid, mode)
            table = resize_position_table(table, grid, mode=mode, align_corners=corners)
        state[keys["positions"]] = table.unsqueeze(0) if vilt else table
    if state is not None:
        check_architecture(
            ckpt.config.get("architecture"), model.architecture, str(ckpt.path), f"preset {preset!r}"
        )
        load_strict(model, state, f"backbone weights of {ckpt.path}")
    return model


def new_backbone(
    preset: str,
    *,
    num_token_types: int = 2,
    vocab_size: int | None = None,
    reducer: ReducerSchedule | None = None,
    attn_impl: AttnImpl = "sdpa",
    reducer_impl: ReducerImpl = "auto",
    vilt_config_override: ViltConfig | None = None,
) -> Backbone:
    """A randomly initialised backbone of ``preset`` (what `build_backbone` loads weights into)."""
    family = preset_family(preset)
    if family == "vilt":
        config = vilt_config_override or vilt_config(**_VILT_PRESETS[preset])
        config.modality_type_vocab_size = num_token_types
        if vocab_size is not None:
            config.vocab_size = vocab_size
        return ViltBackbone(config, reducer=reducer, attn_impl=attn_impl, reducer_impl=reducer_impl)
    meter = replace(_METER_PRESETS[preset], num_token_types=num_token_types)
    if vocab_size is not None:
        meter = replace(meter, vocab_size=vocab_size)
    return MeterBackbone(meter, reducer=reducer, attn_impl=attn_impl, reducer_impl=reducer_impl)


def preset_config(preset: str) -> ViltConfig | MeterConfig:
    """The architecture of ``preset``: a fresh `ViltConfig` (ViLT presets, the caller may edit it) or its
    `MeterConfig` (METER presets, frozen). An unknown name is a ValueError listing the presets."""
    if preset_family(preset) == "vilt":
        return vilt_config(**_VILT_PRESETS[preset])
    return _METER_PRESETS[preset]


def preset_image_size(preset: str) -> int:
    """The image side ``preset`` is built for (its position table's grid times the patch size)."""
    return int(preset_config(preset).image_size)


def preset_depth(preset: str) -> int:
    """Reducible blocks of ``preset``: ViLT's transformer blocks, METER's co-attention blocks (what a reducer
    schedule's block ids index)."""
    config = preset_config(preset)
    return config.num_hidden_layers if isinstance(config, ViltConfig) else config.cross_layers


def _vilt_config_for(preset: str, ckpt: Checkpoint | None) -> ViltConfig | None:
    """The preset's ViltConfig, or an HF directory's own config after checking it is the preset's architecture.

    A converted original ViLT checkpoint keeps the LayerNorm epsilons its converter wrote next to the architecture
    (1e-6, and 1e-12 on the text embeddings); the architecture check then compares the rest.
    """
    config = preset_config(preset)
    assert isinstance(config, ViltConfig)
    if ckpt is not None and ckpt.kind != "hf_vilt":
        recorded = ckpt.config
        if "layer_norm_eps" not in recorded:
            return None
        config.layer_norm_eps = float(recorded["layer_norm_eps"])
        if "text_layer_norm_eps" in recorded:
            config.text_layer_norm_eps = float(recorded["text_layer_norm_eps"])
        elif "source" in ckpt.config and config.layer_norm_eps != 1e-12:
            logger.warning(
                "%s was converted by an older version that gave the text embeddings' LayerNorm eps %g "
                "(original ViLT: 1e-12); pooled outputs differ from the original's by up to ~5e-4. "
                "Convert %s again to get the original's.",
                ckpt.path,
                config.layer_norm_eps,
                ckpt.config["source"],
            )
        return config
    if ckpt is None:
        return None
    hf = ViltConfig.from_dict({k: v for k, v in ckpt.config.items() if k not in ("architectures",)})
    differ = [
        f"{k}: checkpoint {getattr(hf, k)} vs preset {getattr(config, k)}"
        for k in _VILT_CORE
        if getattr(hf, k) != getattr(config, k)
    ]
    if differ:
        raise CheckpointError(f"{ckpt.path} is not a {preset} model: " + "; ".join(differ))
    hf.image_size = config.image_size
    return hf


def _resolve_vocab(requested: int | None, rows: int, path: Path) -> int:
    if requested is not None and requested != rows:
        raise CheckpointError(
            f"{path}: text vocabulary has {rows} rows but vocab_size={requested} was asked for; "
            "leave vocab_size unset to use the checkpoint's"
        )
    return rows


def _resolve_types(table: Tensor, requested: int, path: Path) -> Tensor:
    rows = table.shape[0]
    if rows == requested:
        return table
    if rows > requested:
        raise CheckpointError(
            f"{path}: the checkpoint has {rows} modality type rows; build with num_token_types={rows}"
        )
    logger.info("%s: extending modality type embeddings %d -> %d rows from row 1", path, rows, requested)
    extra = table[1:2].expand(requested - rows, -1)
    return torch.cat([table, extra], dim=0)
