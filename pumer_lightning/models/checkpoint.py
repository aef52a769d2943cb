"""Reading, writing and strictly loading backbone (and head) weights.

Two checkpoint kinds are read:

* **ours** (written by `save_checkpoint` and by ``python -m pumer_lightning.models.convert``): a directory
  holding ``pumer_config.json`` and ``model.safetensors``, or a single ``.pt`` file with the same content. Weight
  keys are ``backbone.<name>`` and ``head.<name>``.
* **HF ViLT directories** (``config.json`` with ``model_type: vilt`` and ``model.safetensors`` or
  ``pytorch_model.bin``), as written by transformers' ``save_pretrained`` for ``ViltModel`` or any ViLT task model.

Everything is local: no hub access.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import TASKS

logger = logging.getLogger(__name__)

FORMAT = "pumer-lightning"
FORMAT_VERSION = 1
CONFIG_NAME = "pumer_config.json"
WEIGHTS_NAME = "model.safetensors"

# Head key prefixes of HF ViLT task models, by architecture, and the task they hold.
_HF_VILT_HEADS: dict[str, tuple[str | None, dict[str, str]]] = {
    "ViltForQuestionAnswering": ("vqa2", {"classifier.": ""}),
    "ViltForImagesAndTextClassification": ("nlvr2", {"classifier.": ""}),
    "ViltForImageAndTextRetrieval": ("retrieval", {"rank_output.": "rank_output."}),
    "ViltForMaskedLM": (None, {}),
    "ViltModel": (None, {}),
}
# Heads present in HF task checkpoints that have no counterpart here (dropped, and logged).
_HF_VILT_UNUSED_HEADS = ("mlm_score.",)
# Non-persistent buffers that older library versions saved.
_STALE_BUFFERS = ("embeddings.text_embeddings.position_ids", "embeddings.text_embeddings.token_type_ids")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into; the message names every offending key."""


@dataclass
class Checkpoint:
    """Weights read from disk, split into backbone and head parts in our key names.

    Attributes:
        path: where they came from.
        kind: ``"pumer"`` (ours) or ``"hf_vilt"``.
        family: ``"vilt"`` or ``"meter"``.
        backbone: backbone state dict (our backbone's key names).
        head: head state dict (our head's key names); empty when the checkpoint has no task head.
        task: the task of ``head`` or None.
        preset: the preset the weights were converted for (ours only).
        config: ``pumer_config.json`` content (ours) or the HF ``config.json`` content.
    """

    path: Path
    kind: Literal["pumer", "hf_vilt"]
    family: Literal["vilt", "meter"]
    backbone: dict[str, Tensor]
    head: dict[str, Tensor] = field(default_factory=dict)
    task: str | None = None
    preset: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


def unreadable_reason(path: str | Path) -> str | None:
    """Why a checkpoint file cannot be read as one (empty, truncated, damaged or random bytes), or None when its
    container looks intact: a PyTorch zip archive whose members pass their CRC check, a legacy pickle, or a
    safetensors file whose header and tensor extents fit the file. Reads the whole file once."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as err:
        return f"it cannot be opened ({err.strerror or err})"
    if size == 0:
        return "the file is empty (0 bytes)"
    if path.suffix == ".safetensors":
        return _safetensors_reason(path, size)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
                names = archive.namelist()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
            return f"the file is corrupt or truncated (damaged zip archive: {err})"
        if damaged is not None:
            return f"the file is corrupt (member {damaged} fails its CRC check)"
        if not any(n.endswith("data.pkl") for n in names):
            return "it is a zip archive but not a PyTorch checkpoint (no data.pkl inside)"
        return None
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return None  # a legacy (pre-zip) torch.save pickle (PROTO opcode, protocol 2-5): torch.load has the last word
    return "the file is corrupt or not a checkpoint (neither a PyTorch zip archive nor a pickle)"


def _safetensors_reason(path: Path, size: int) -> str | None:
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length <= 0 or 8 + length > size:
            return "the file is corrupt or truncated (its safetensors header does not fit the file)"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "the file is corrupt (its safetensors header is not valid JSON)"
    if not isinstance(header, dict):
        return "the file is corrupt (its safetensors header is not a table of tensors)"
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets") or ()) == 2
    ]
    if 8 + length + max(ends, default=0) > size:
        return "the file is truncated (the tensors its header lists run past the end of the file)"
    return None


def _unreadable(path: Path, err: BaseException, what: str = "checkpoint", hint: str = "") -> CheckpointError:
    """A `CheckpointError` for a file that failed to load: corrupt (named as such), or intact but not loadable
    (then ``hint`` follows the loader's first line)."""
    reason = unreadable_reason(path)
    if reason is not None:
        return CheckpointError(f"{what} {path} is unreadable: {reason}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointError(f"{what} {path} could not be read: {type(err).__name__}: {first}{hint}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is corrupt: not valid JSON ({err})") from err


def _load_weights_file(path: Path) -> dict[str, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _unreadable(path, err, "weights file") from err


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` (a converted checkpoint file or directory, or an HF ViLT directory) cannot be read, or None.

    Checks what `read_checkpoint` will open (the JSON files parse, the weight files are intact containers) without
    building anything, so that a command line can stop at once naming the file."""
    path = Path(path)
    if not path.exists():
        return f"{path} does not exist"
    if path.is_file():
        reason = unreadable_reason(path)
        return f"{path} is unreadable: {reason}" if reason else None
    if (path / CONFIG_NAME).is_file():
        files = [path / CONFIG_NAME, path / WEIGHTS_NAME]
    elif (path / "config.json").is_file():
        weights = [path / "model.safetensors", path / "pytorch_model.bin"]
        files = [path / "config.json", next((f for f in weights if f.is_file()), weights[0])]
    else:
        return (
            f"{path} is neither a {FORMAT} checkpoint ({CONFIG_NAME} + {WEIGHTS_NAME}) nor an HF ViLT directory "
            "(config.json + model.safetensors)"
        )
    for file in files:
        if not file.is_file():
            return f"{path} has no {file.name}"
        if file.suffix == ".json":
            try:
                json.loads(file.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                return f"{file} is corrupt: not valid JSON ({err})"
        else:
            reason = unreadable_reason(file)
            if reason:
                return f"{file} is unreadable: {reason}"
    return None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read our converted checkpoint (directory or ``.pt`` file) or an HF ViLT directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            hint = (
                f"; it is not a {FORMAT} checkpoint file: original METER/ViLT .ckpt files must be converted first: "
                f"python -m pumer_lightning.models.convert meter|vilt {path} OUT_DIR"
            )
            raise _unreadable(path, err, hint=hint) from err
        if not isinstance(blob, dict) or blob.get("config", {}).get("format") != FORMAT:
            raise CheckpointError(
                f"{path} is not a {FORMAT} checkpoint file; original METER/ViLT .ckpt files must be converted "
                f"first: python -m pumer_lightning.models.convert meter|vilt {path} OUT_DIR"
            )
        return _from_ours(path, blob["config"], blob["state_dict"])
    if (path / CONFIG_NAME).is_file():
        config = _read_json(path / CONFIG_NAME)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        return _from_ours(path, config, _load_weights_file(weights))
    if (path / "config.json").is_file():
        return _from_hf_vilt(path)
    raise CheckpointError(
        f"{path} is neither a {FORMAT} checkpoint ({CONFIG_NAME} + {WEIGHTS_NAME}) nor an HF ViLT directory "
        "(config.json + model.safetensors)"
    )


def _from_ours(path: Path, config: dict[str, Any], state: dict[str, Tensor]) -> Checkpoint:
    if config.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: {CONFIG_NAME} has format {config.get('format')!r}, expected {FORMAT!r}"
        )
    if config.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {config['version']} is newer than this code's {FORMAT_VERSION}"
        )
    if config.get("family") not in ("vilt", "meter"):
        raise CheckpointError(f"{path}: {CONFIG_NAME} names no known family (got {config.get('family')!r})")
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    other = sorted(k for k in state if not k.startswith(("backbone.", "head.")))
    if other:
        raise CheckpointError(f"{path}: keys outside backbone./head.: {other}")
    return Checkpoint(
        path=path,
        kind="pumer",
        family=config["family"],
        backbone=backbone,
        head=head,
        task=config.get("task"),
        preset=config.get("preset"),
        config=config,
    )


def _from_hf_vilt(path: Path) -> Checkpoint:
    config = _read_json(path / "config.json")
    if config.get("model_type") != "vilt":
        raise CheckpointError(
            f"{path}/config.json has model_type {config.get('model_type')!r}, expected 'vilt'"
        )
    files = [path / "model.safetensors", path / "pytorch_model.bin"]
    weights = next((f for f in files if f.is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path} has no model.safetensors or pytorch_model.bin")
    state = _load_weights_file(weights)
    architectures = config.get("architectures") or ["ViltModel"]
    arch = architectures[0]
    if arch not in _HF_VILT_HEADS:
        raise CheckpointError(
            f"{path}: unsupported ViLT architecture {arch}; known: {sorted(_HF_VILT_HEADS)}"
        )
    task, head_map = _HF_VILT_HEADS[arch]

    prefixed = any(k.startswith("vilt.") for k in state)
    backbone: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        if prefixed and key.startswith("vilt."):
            name = key[len("vilt.") :]
            if name in _STALE_BUFFERS:
                dropped.append(key)
            else:
                backbone[name] = value
            continue
        if not prefixed:
            if key in _STALE_BUFFERS:
                dropped.append(key)
            else:
                backbone[key] = value
            continue
        target = next((new + key[len(old) :] for old, new in head_map.items() if key.startswith(old)), None)
        if target is not None:
            head[target] = value
        elif key.startswith(_HF_VILT_UNUSED_HEADS):
            dropped.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{path}: keys of {arch} that are neither backbone nor a known head: {sorted(unknown)}"
        )
    if dropped:
        logger.info(
            "%s: ignoring %d keys without a counterpart here: %s", path, len(dropped), sorted(dropped)
        )
    return Checkpoint(
        path=path, kind="hf_vilt", family="vilt", backbone=backbone, head=head, task=task, config=config
    )


def save_checkpoint(
    dst: str | Path,
    backbone: nn.Module,
    *,
    preset: str,
    head: nn.Module | None = None,
    task: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``backbone`` (and optionally ``head`` for ``task``) in our format.

    ``dst`` ending in ``.pt`` gives a single file; anything else a directory with ``pumer_config.json`` and
    ``model.safetensors``. The result loads with ``build_backbone(preset, dst)`` and `load_head_weights`.
    """
    if (head is None) != (task is None):
        raise ValueError("save_checkpoint: give both head and task, or neither")
    if task is not None and task not in TASKS:
        raise ValueError(f"save_checkpoint: unknown task {task!r}; expected one of {TASKS}")
    config: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "family": backbone.family,
        "preset": preset,
        "image_size": backbone.image_size,
        "num_token_types": backbone.num_token_types,
        "architecture": backbone.architecture,
        "task": task,
        # the LayerNorm epsilons a ViLT backbone is rebuilt with (a converted original ViLT's differ from the
        # preset's; `build_backbone` restores them, then checks the architecture)
        **{k: v for k, v in backbone.architecture.items() if k in ("layer_norm_eps", "text_layer_norm_eps")},
        **(extra or {}),
    }
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    if head is not None:
        config["head_shapes"] = {k: list(v.shape) for k, v in head.state_dict().items()}
        state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    dst = Path(dst)
    if dst.suffix == ".pt":
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": config, "state_dict": state}, dst)
        return dst
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / WEIGHTS_NAME), metadata={"format": FORMAT})
    (dst / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return dst


def check_state_dict(
    module: nn.Module, state: dict[str, Tensor], what: str, skip: tuple[str, ...] = ()
) -> None:
    """Raise `CheckpointError` naming every missing, unexpected and wrongly shaped key (keys starting with one of
    ``skip`` left out on the module's side)."""
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = [f"{what} does not match the model:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                parts.append(f"  {label} ({len(keys)}):\n    " + "\n    ".join(keys))
        raise CheckpointError("\n".join(parts))


def check_architecture(saved: dict[str, Any] | None, current: dict[str, Any], what: str, model: str) -> None:
    """Raise `CheckpointError` when a checkpoint's recorded ``Backbone.architecture`` differs from the model it is
    loaded into (a preset edited since the checkpoint was saved: same shapes, other computation, e.g. more heads).

    Only fields both sides record are compared; a checkpoint that records none (saved before they were recorded)
    passes. ``what`` names the checkpoint, ``model`` what it is loaded into (``preset 'vilt_mini'``).
    """
    if not saved:
        return
    differ = [
        f"{k}: checkpoint {saved[k]!r} vs {model} {current[k]!r}"
        for k in sorted(set(saved) & set(current))
        if saved[k] != current[k]
    ]
    if differ:
        raise CheckpointError(
            f"{what} was saved from another architecture than {model}:\n  "
            + "\n  ".join(differ)
            + "\nBuild it with the preset it was trained with (the preset's definition may have changed since)."
        )


#: Where `load_task_weights` points a user who gave it something else than a Lightning checkpoint.
LIGHTNING_CHECKPOINT = (
    "a Lightning checkpoint written by `make exp` or `python -m pumer_lightning fit` "
    "(runs/<name>/version_N/checkpoints/best-*.ckpt)"
)


def load_task_weights(
    module: nn.Module, path: str | Path, what: str, model: str, skip: tuple[str, ...] = ("teacher.",)
) -> None:
    """Load a task's weights from a Lightning checkpoint (``fit``'s ``.ckpt``) into ``module``: the one loader of
    every command that reads one outside ``trainer.fit/test(ckpt_path=...)`` (the distillation teacher, ``make
    tune``, ``make study``).

    ``module`` has a ``backbone`` (a task module, or the teacher's ``{"backbone", "head"}``). The file must be an
    intact checkpoint holding a ``state_dict``; the architecture it recorded must equal the backbone's
    (`check_architecture`: the same shapes can hide another computation, e.g. more heads); then every key but
    those starting with ``skip`` (a distilled run's teacher) loads strictly. ``what`` names the checkpoint in
    errors (``--ckpt runs/x.ckpt``), ``model`` what it is loaded into (``preset 'vilt_small'``); every error is
    a `CheckpointError`.
    """
    path = Path(path)
    reason = unreadable_reason(path)
    if reason:
        raise CheckpointError(f"{what} is unreadable: {reason}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{what} could not be read: {type(err).__name__}: {err}") from err
    state = blob.get("state_dict") if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} holds no state_dict: expected {LIGHTNING_CHECKPOINT}")
    check_architecture(blob.get("backbone_architecture"), module.backbone.architecture, what, model)
    own = {k: v for k, v in state.items() if not k.startswith(skip)}
    check_state_dict(module, own, what, skip)
    module.load_state_dict(own, strict=False)


def load_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` with a message naming every offending key."""
    check_state_dict(module, state, what)
    module.load_state_dict(state, strict=True)


def load_head_weights(head: nn.Module, checkpoint: str | Path | Checkpoint, task: str) -> None:
    """Load the ``task`` head of a checkpoint into ``head`` (strict).

    HF ViLT retrieval directories hold only ``rank_output``; their missing ITM weights are reported like any
    other missing key.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    if not ckpt.head:
        raise CheckpointError(f"{ckpt.path} holds no task head (backbone only)")
    if ckpt.task != task:
        raise CheckpointError(f"{ckpt.path} holds a {ckpt.task!r} head, not {task!r}")
    load_strict(head, ckpt.head, f"head of {ckpt.path}")


def resize_position_table(table: Tensor, grid: int, *, mode: str, align_corners: bool | None) -> Tensor:
    """Resize a ``(1 + g*g, C)`` position table (CLS row first) to ``(1 + grid*grid, C)``, keeping the CLS row."""
    old = round((table.shape[0] - 1) ** 0.5)
    if old * old + 1 != table.shape[0]:
        raise ValueError(f"position table of {table.shape[0]} rows is not 1 + a square grid")
    if old == grid:
        return table
    channels = table.shape[1]
    patches = table[1:].float().reshape(1, old, old, channels).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode=mode, align_corners=align_corners)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, channels).to(table.dtype)
    return torch.cat([table[:1], patches], dim=0)
