"""Convert original METER and ViLT ``.ckpt`` files into our checkpoint format.

    python -m pumer_lightning.models.convert meter meter_clip16_288_roberta_vqa.ckpt out/meter_vqa_384 --image-size 384
    python -m pumer_lightning.models.convert meter meter_clip16_288_roberta_pretrain.ckpt out/meter_nlvr2 --task nlvr2
    python -m pumer_lightning.models.convert vilt vilt_200k_mlm_itm.ckpt out/vilt_irtr --task retrieval

METER (docs/backbones.md#converting-original-checkpoints): ``vit_model.visual.*`` (OpenAI CLIP naming, fused
``attn.in_proj_*``) becomes
transformers' `CLIPVisionModel` naming with separate q/k/v; ``text_transformer.*``, ``cross_modal_*`` and
``token_type_embeddings`` keep their names. ViLT: timm's ``transformer.blocks.N.attn.qkv`` etc. become
transformers' `ViltModel` naming.

Rules: position embeddings are resized bicubically (CLS row kept) when ``--image-size`` differs from the source;
``--token-types 3`` (implied by ``--task nlvr2``) adds type row 2 as a copy of row 1; ``--task retrieval`` on a
checkpoint without ``rank_output`` initialises it from the ITM "match" row. The task head is taken from the
source when present (``vqa_classifier``, ``nlvr2_classifier``, ``snli_classifier``, ``rank_output`` +
``itm_score``). Unused source keys (MLM/MPP heads, CLIP's text parts, RoBERTa's pooler, stale buffers) are
listed and dropped; any other unknown key is an error. The result is loaded strictly into the model before it
is written, so a mismatch names every missing and unexpected key.
"""

from __future__ import annotations

import pickle
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from pumer_lightning.command import Command, flag

from .base import Backbone
from .build import PRESETS, new_backbone, preset_config, preset_family, preset_image_size
from .checkpoint import (
    CheckpointError,
    load_strict,
    resize_position_table,
    save_checkpoint,
    unreadable_reason,
)
from .heads import TASKS, build_head

_HEAD_SOURCES = {"vqa_classifier.": "vqa2", "nlvr2_classifier.": "nlvr2", "snli_classifier.": "snli_ve"}


@dataclass
class Converted:
    """Source weights in our names, before they are loaded and written."""

    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]]  # task -> head state dict in our head's names
    itm: dict[str, Tensor] | None  # ITM head (``weight``, ``bias``) when the source has one
    dropped: list[str] = field(default_factory=list)


# ---- METER ------------------------------------------------------------------------------------------------------
_CLIP_BLOCK = re.compile(r"vit_model\.visual\.transformer\.resblocks\.(\d+)\.(.+)")
_CLIP_BLOCK_RENAMES = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
}
_CLIP_RENAMES = {
    "vit_model.visual.conv1.weight": "vit_model.embeddings.patch_embedding.weight",
    "vit_model.visual.class_embedding": "vit_model.embeddings.class_embedding",
    "vit_model.visual.positional_embedding": "vit_model.embeddings.position_embedding.weight",
    "vit_model.visual.ln_pre.weight": "vit_model.pre_layrnorm.weight",
    "vit_model.visual.ln_pre.bias": "vit_model.pre_layrnorm.bias",
    "vit_model.visual.ln_post.weight": "vit_model.post_layernorm.weight",
    "vit_model.visual.ln_post.bias": "vit_model.post_layernorm.bias",
}
_METER_KEEP = ("text_transformer.", "cross_modal_", "token_type_embeddings.")
_METER_UNUSED = (
    "text_transformer.pooler.",
    "text_transformer.embeddings.position_ids",
    "text_transformer.embeddings.token_type_ids",
    "vit_model.token_embedding.",
    "vit_model.positional_embedding",
    "vit_model.ln_final.",
    "vit_model.transformer.",
    "vit_model.text_projection",
    "vit_model.logit_scale",
    "vit_model.visual.proj",
    "mlm_score.",
)


def _split_qkv(weight: Tensor, prefix: str, names: tuple[str, str, str], suffix: str) -> dict[str, Tensor]:
    q, k, v = weight.chunk(3, dim=0)
    return {f"{prefix}{n}.{suffix}": t.clone() for n, t in zip(names, (q, k, v))}


def convert_meter_state(state: dict[str, Tensor]) -> Converted:
    """Rename an original METER state dict (docs/backbones.md) into our METER backbone and head names."""
    out = Converted(backbone={}, heads={}, itm=None)
    for key, value in state.items():
        if key.startswith(_METER_UNUSED):
            out.dropped.append(key)
        elif key in _CLIP_RENAMES:
            out.backbone[_CLIP_RENAMES[key]] = value
        elif match := _CLIP_BLOCK.fullmatch(key):
            index, rest = match.groups()
            prefix = f"vit_model.encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                suffix = "weight" if rest.endswith("weight") else "bias"
                out.backbone.update(
                    _split_qkv(value, prefix + "self_attn.", ("q_proj", "k_proj", "v_proj"), suffix)
                )
            elif rest in _CLIP_BLOCK_RENAMES:
                out.backbone[prefix + _CLIP_BLOCK_RENAMES[rest]] = value
            else:
                raise CheckpointError(f"unknown CLIP block key {key}")
        elif key.startswith(_METER_KEEP):
            out.backbone[key] = value
        elif not _take_head(key, value, out):
            raise CheckpointError(f"unknown METER key {key}")
    return out


# ---- ViLT -------------------------------------------------------------------------------------------------------
_TIMM_BLOCK = re.compile(r"transformer\.blocks\.(\d+)\.(.+)")
_TIMM_BLOCK_RENAMES = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_VILT_RENAMES = {
    "token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
    "transformer.cls_token": "embeddings.cls_token",
    "transformer.pos_embed": "embeddings.position_embeddings",
    "transformer.patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "transformer.patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "transformer.norm.weight": "layernorm.weight",
    "transformer.norm.bias": "layernorm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}
_VILT_UNUSED = (
    "text_embeddings.position_ids",
    "text_embeddings.token_type_ids",
    "transformer.mask_token",
    "transformer.head.",
    "transformer.pre_logits.",
    "mlm_score.",
    "mpp_score.",
)


def convert_vilt_state(state: dict[str, Tensor]) -> Converted:
    """Rename an original (timm-style) ViLT state dict into transformers' ViltModel names."""
    out = Converted(backbone={}, heads={}, itm=None)
    for key, value in state.items():
        if key.startswith(_VILT_UNUSED):
            out.dropped.append(key)
        elif key in _VILT_RENAMES:
            out.backbone[_VILT_RENAMES[key]] = value
        elif key.startswith("text_embeddings."):
            out.backbone["embeddings." + key] = value
        elif match := _TIMM_BLOCK.fullmatch(key):
            index, rest = match.groups()
            prefix = f"encoder.layer.{index}."
            module, _, suffix = rest.rpartition(".")
            if module == "attn.qkv":
                out.backbone.update(
                    _split_qkv(value, prefix + "attention.attention.", ("query", "key", "value"), suffix)
                )
            elif module in _TIMM_BLOCK_RENAMES:
                out.backbone[f"{prefix}{_TIMM_BLOCK_RENAMES[module]}.{suffix}"] = value
            else:
                raise CheckpointError(f"unknown ViLT block key {key}")
        elif not _take_head(key, value, out):
            raise CheckpointError(f"unknown ViLT key {key}")
    return out


def _take_head(key: str, value: Tensor, out: Converted) -> bool:
    """File a task-head key of either original model; False when ``key`` is not one."""
    for prefix, task in _HEAD_SOURCES.items():
        if key.startswith(prefix):
            out.heads.setdefault(task, {})[key[len(prefix) :]] = value
            return True
    if key.startswith("rank_output."):
        out.heads.setdefault("retrieval", {})[key] = value
        return True
    if key.startswith("itm_score.fc."):
        out.itm = out.itm or {}
        out.itm[key[len("itm_score.fc.") :]] = value
        return True
    return False


# ---- the conversion -------------------------------------------------------------------------------------------
_CONVERTERS: dict[str, Callable[[dict[str, Tensor]], Converted]] = {
    "meter": convert_meter_state,
    "vilt": convert_vilt_state,
}
_KEYS = {
    "meter": (
        "token_type_embeddings.weight",
        "vit_model.embeddings.position_embedding.weight",
        "vit_model.embeddings.patch_embedding.weight",
        "text_transformer.embeddings.word_embeddings.weight",
    ),
    "vilt": (
        "embeddings.token_type_embeddings.weight",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.text_embeddings.word_embeddings.weight",
    ),
}


def load_original(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The ``state_dict`` of an original PyTorch-Lightning ``.ckpt`` (or a bare state dict file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    reason = unreadable_reason(path)
    if reason is not None:
        raise CheckpointError(f"{path} is unreadable: {reason}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        if trust_pickle:
            raise CheckpointError(f"{path} is unreadable: the pickle inside is damaged ({err})") from err
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"{path} holds Python objects besides tensors (e.g. a training config); if you trust the file, "
            f"convert with --trust-pickle. ({first})"
        ) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{path} is unreadable: {type(err).__name__}: {err}") from err
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return state


def convert(
    family: str,
    src: str | Path,
    dst: str | Path,
    *,
    preset: str | None = None,
    image_size: int | None = None,
    token_types: int | None = None,
    task: str | None = None,
    trust_pickle: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Convert an original checkpoint; returns the written path (see the module docstring for the rules)."""
    if family not in _CONVERTERS:
        raise ValueError(f"family must be one of {sorted(_CONVERTERS)}, got {family!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    converted = _load_converted(family, src, trust_pickle)
    state = converted.backbone
    preset, target_size = _fit_positions(family, state, preset, image_size, log)
    task = _resolve_task(task, converted, src, log)
    head_state = _head_state(task, converted, log) if task is not None else None
    wanted = _fit_token_types(state, _KEYS[family][0], token_types, task, log)
    backbone = new_backbone(
        preset,
        num_token_types=wanted,
        vocab_size=state[_KEYS[family][3]].shape[0],
        vilt_config_override=original_vilt_config(preset) if family == "vilt" else None,
    )
    load_strict(backbone, state, f"converted {family} backbone from {src}")
    if family == "vilt":
        eps = backbone.architecture
        log(
            f"LayerNorm eps as original ViLT: {eps['layer_norm_eps']:g} (blocks, final norm), "
            f"{eps['text_layer_norm_eps']:g} (text embeddings)"
        )
    head = _converted_head(task, head_state, backbone, src)
    if converted.dropped:
        log(
            f"dropped {len(converted.dropped)} source keys without a counterpart: {_summarise(converted.dropped)}"
        )
    out = save_checkpoint(
        dst,
        backbone,
        preset=preset,
        head=head,
        task=task if head is not None else None,
        extra={"source": str(src)},
    )
    log(
        f"wrote {out} ({family}, preset {preset}, {target_size} px, {wanted} type rows, head: {task or 'none'})"
    )
    return out


def _load_converted(family: str, src: str | Path, trust_pickle: bool) -> Converted:
    """The original checkpoint at ``src`` renamed to our keys; refuses one without the keys the rules need."""
    converted = _CONVERTERS[family](load_original(src, trust_pickle=trust_pickle))
    missing = [k for k in _KEYS[family] if k not in converted.backbone]
    if missing:
        raise CheckpointError(
            f"{src} is not a complete original {family} checkpoint: no source for {missing}"
        )
    return converted


def _fit_positions(
    family: str,
    state: dict[str, Tensor],
    preset: str | None,
    image_size: int | None,
    log: Callable[[str], None],
) -> tuple[str, int]:
    """Resize the position table in ``state`` from the source grid to the preset's; returns (preset, px)."""
    _, pos_key, patch_key, _ = _KEYS[family]
    patch = state[patch_key].shape[-1]
    table = state[pos_key][0] if family == "vilt" else state[pos_key]
    source_size = round((table.shape[0] - 1) ** 0.5) * patch
    if preset is None:
        preset = _default_preset(family, image_size or source_size)
    if preset_family(preset) != family:
        raise ValueError(f"preset {preset!r} is not a {family} preset")
    target_size = image_size or preset_image_size(preset)
    if target_size != preset_image_size(preset):
        raise ValueError(
            f"preset {preset} is built for {preset_image_size(preset)} px, not --image-size {target_size}"
        )
    if target_size % patch:
        raise ValueError(f"--image-size {target_size} is not a multiple of the patch size {patch}")
    if target_size != source_size:
        mode, corners = ("bicubic", False) if family == "meter" else ("bilinear", True)
        table = resize_position_table(table, target_size // patch, mode=mode, align_corners=corners)
        log(f"position embeddings: {source_size} px -> {target_size} px ({mode}, CLS row kept)")
    state[pos_key] = table.unsqueeze(0) if family == "vilt" else table
    return preset, target_size


def _fit_token_types(
    state: dict[str, Tensor],
    types_key: str,
    token_types: int | None,
    task: str | None,
    log: Callable[[str], None],
) -> int:
    """Grow the modality type rows in ``state`` to ``token_types`` (3 for NLVR2's two images); returns it."""
    rows = state[types_key].shape[0]
    wanted = token_types or max(rows, 3 if task == "nlvr2" else 2)
    if wanted < rows:
        raise ValueError(f"--token-types {wanted} is fewer than the source's {rows} type rows")
    if wanted > rows:
        state[types_key] = torch.cat([state[types_key], state[types_key][1:2].expand(wanted - rows, -1)])
        log(f"modality type embeddings: {rows} -> {wanted} rows (new rows copied from row 1)")
    return wanted


def _converted_head(
    task: str | None, head_state: dict[str, Tensor] | None, backbone: Backbone, src: str | Path
) -> nn.Module | None:
    """The task head built for ``backbone`` and loaded from the converted head weights (None without them)."""
    if head_state is None:
        return None
    num_answers = head_state["3.weight"].shape[0] if task == "vqa2" else 3129
    head = build_head(task, backbone.hidden_size, num_answers, width=backbone.head_width)
    load_strict(head, head_state, f"converted {task} head from {src}")
    return head


#: LayerNorm epsilons of original ViLT: timm's `VisionTransformer` blocks and final norm use 1e-6, the text
#: embeddings (transformers' `BertEmbeddings` under a default `BertConfig`) 1e-12. transformers' `ViltConfig` has one
#: epsilon for all (default 1e-12); either single value moves the pooled output by up to ~5e-4 on weights at the
#: originals' initial scale.
ORIGINAL_VILT_LAYER_NORM_EPS = 1e-6
ORIGINAL_VILT_TEXT_LAYER_NORM_EPS = 1e-12


def original_vilt_config(preset: str):
    """``preset``'s `ViltConfig` with original ViLT's LayerNorm epsilons, for converted original checkpoints.

    Blocks and final norm get 1e-6 (``layer_norm_eps``), the text embeddings 1e-12 (``text_layer_norm_eps``); both
    are recorded in the written checkpoint's architecture and restored by `build_backbone`. HF ViLT directories
    are not converted (they load as they are) and keep their own ``layer_norm_eps``.
    """
    if preset_family(preset) != "vilt":
        raise ValueError(f"preset {preset!r} is not a ViLT preset")
    config = preset_config(preset)
    config.layer_norm_eps = ORIGINAL_VILT_LAYER_NORM_EPS
    config.text_layer_norm_eps = ORIGINAL_VILT_TEXT_LAYER_NORM_EPS
    return config


def _default_preset(family: str, image_size: int) -> str:
    if family == "vilt":
        return "vilt_b32"
    name = f"meter_b16_{image_size}"
    if name not in PRESETS:
        raise ValueError(f"no METER preset for {image_size} px; pass --image-size 288 or 384, or --preset")
    return name


def _resolve_task(
    task: str | None, converted: Converted, src: str | Path, log: Callable[[str], None]
) -> str | None:
    present = sorted(converted.heads)
    if task is None:
        if len(present) > 1:
            raise ValueError(f"{src} holds several task heads {present}; choose one with --task")
        return present[0] if present else None
    others = [t for t in present if t != task]
    if others:
        log(f"dropping the source's {others} head(s); keeping {task}")
    return task


def _head_state(task: str, converted: Converted, log: Callable[[str], None]) -> dict[str, Tensor] | None:
    if task != "retrieval":
        if task not in converted.heads:
            log(
                f"the source has no {task} head: only the backbone is converted (train the head from scratch)"
            )
            return None
        return converted.heads[task]
    if converted.itm is None:
        log("the source has no ITM head: only the backbone is converted")
        return None
    itm = converted.itm
    rank = converted.heads.get("retrieval")
    if rank is None:
        rank = {"rank_output.weight": itm["weight"][1:].clone(), "rank_output.bias": itm["bias"][1:].clone()}
        log("rank_output initialised from the ITM 'match' row")
    return {**rank, "itm.weight": itm["weight"], "itm.bias": itm["bias"]}


def _summarise(keys: list[str]) -> str:
    groups: dict[str, int] = {}
    for key in keys:
        prefix = ".".join(key.split(".")[:2])
        groups[prefix] = groups.get(prefix, 0) + 1
    return ", ".join(f"{p}.* ({n})" if n > 1 else p for p, n in sorted(groups.items()))


@dataclass
class ConvertArgs:
    """Convert an original METER or ViLT .ckpt into a pumer-lightning checkpoint directory."""

    family: str = field(metadata=flag(positional=True, choices=sorted(_CONVERTERS)))
    """which original model the file comes from"""
    src: Path = field(metadata=flag(positional=True))
    """original .ckpt (PyTorch-Lightning) or state-dict file"""
    dst: Path = field(metadata=flag(positional=True))
    """output directory (or a .pt file)"""
    image_size: int | None = None
    """target resolution; position embeddings are resized bicubically (default: the source's)"""
    token_types: int | None = None
    """modality type rows (3 for NLVR2; implied by --task nlvr2)"""
    task: str | None = field(default=None, metadata=flag(choices=TASKS))
    """task head to keep (default: the one head the source holds, if any)"""
    preset: str | None = field(default=None, metadata=flag(choices=PRESETS))
    """architecture to check against (default: from the family and image size)"""
    trust_pickle: bool = False
    """allow arbitrary pickled objects in the source file (only for files you trust)"""


def run_convert(args: ConvertArgs) -> int:
    """Convert; 1 (and one message) when the source is missing or refused."""
    try:
        convert(
            args.family,
            args.src,
            args.dst,
            preset=args.preset,
            image_size=args.image_size,
            token_types=args.token_types,
            task=args.task,
            trust_pickle=args.trust_pickle,
        )
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


COMMAND = Command(ConvertArgs, run_convert, prog="python -m pumer_lightning.models.convert")


def main(argv: list[str] | None = None) -> int:
    """``python -m pumer_lightning.models.convert`` (``pumer convert``)."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
