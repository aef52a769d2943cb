"""What every backbone offers the tasks: the `Backbone` contract and its output."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pumer_lightning.reduce import ReducerSchedule, ReductionState, ReductionTrace, size_bias

from .attention import AttnImpl, check_attn_impl, key_bias


@dataclass
class BackboneOutput:
    """Features of one forward pass.

    Attributes:
        pooled: (B, hidden_size) features for a task head.
        text_states: (B, Lt', C) final text states (Lt' < Lt once text tokens were merged).
        text_mask: (B, Lt') int64, 1 for real text tokens of ``text_states``.
        image_states: (B, Ni', C) final image states, the image CLS at index 0.
        trace: tokens entering each reducible layer and, when asked for, patch maps after each reduction.
    """

    pooled: Tensor
    text_states: Tensor
    text_mask: Tensor
    image_states: Tensor
    trace: ReductionTrace


class Backbone(nn.Module):
    """A vision-language encoder whose cross-modal layers can host PuMer reducers.

    Attributes:
        family: ``"vilt"`` or ``"meter"``.
        hidden_size: size of ``BackboneOutput.pooled`` (768 for ViLT-B, 1536 for METER).
        head_width: inner width of the original task heads (1536 for both full-size models; see `heads.py`).
        num_layers: reducible layers (ViLT: transformer blocks; METER: co-attention blocks).
        image_size, patch_size: the square input resolution the position embeddings were made for.
        max_text_len: default text truncation length for the data pipeline.
        image_preprocess: ``"vilt"`` (mean/std 0.5) or ``"clip"`` (CLIP statistics), for the transforms.
        vocab_size, pad_token_id: the text vocabulary (ViLT: BERT, [PAD] = 0; METER: RoBERTa, <pad> = 1).
        num_token_types: rows of the modality type embedding (3 when the backbone serves NLVR2's two images).
        reducer: the `ReducerSchedule` (or None); settable at run time, checked against ``num_layers``.
        attn_impl: ``"sdpa"`` (fused kernels) or ``"eager"`` (explicit softmax, for parity tests).
        reducer_impl: how a reduction step runs: ``"eager"`` (a few dozen small ops), ``"compiled"`` (one
            ``torch.compile`` region per plan, a few fused kernels; compiled on first use) or ``"auto"`` (compiled
            on CUDA, where every op is a kernel launch; eager elsewhere).
    """

    family: Literal["vilt", "meter"]
    hidden_size: int
    head_width: int
    num_layers: int
    image_size: int
    patch_size: int
    max_text_len: int
    image_preprocess: Literal["vilt", "clip"]
    num_token_types: int
    vocab_size: int
    pad_token_id: int
    text_position_limit: int

    def __init__(self, attn_impl: AttnImpl, reducer_impl: ReducerImpl = "auto") -> None:
        super().__init__()
        self.attn_impl = check_attn_impl(attn_impl)
        self.reducer_impl = check_reducer_impl(reducer_impl)
        self._reducer: ReducerSchedule | None = None

    @property
    def reducer(self) -> ReducerSchedule | None:
        return self._reducer

    @reducer.setter
    def reducer(self, schedule: ReducerSchedule | None) -> None:
        if schedule is not None:
            if not isinstance(schedule, ReducerSchedule):
                raise TypeError(f"reducer must be a ReducerSchedule or None, got {type(schedule).__name__}")
            schedule.check_depth(self.num_layers, f"{self.family} backbone")
        self._reducer = schedule

    @contextlib.contextmanager
    def using(self, schedule: ReducerSchedule | None) -> Iterator[Backbone]:
        """Run with ``schedule`` (None: unreduced) inside the block, then restore the backbone's own schedule."""
        own = self._reducer
        self.reducer = schedule
        try:
            yield self
        finally:
            self._reducer = own

    @contextlib.contextmanager
    def using_reducer_impl(self, reducer_impl: ReducerImpl) -> Iterator[Backbone]:
        """Run reduction steps as ``reducer_impl`` inside the block, then restore the backbone's own."""
        own = self.reducer_impl
        self.reducer_impl = check_reducer_impl(reducer_impl)
        try:
            yield self
        finally:
            self.reducer_impl = own

    def set_attn_impl(self, attn_impl: AttnImpl) -> None:
        """Switch between fused (``"sdpa"``) and explicit-softmax (``"eager"``) attention."""
        self.attn_impl = check_attn_impl(attn_impl)

    def reduce_compiled(self, x: Tensor) -> bool:
        """Whether reduction steps on ``x`` run compiled (see ``reducer_impl``)."""
        return self.reducer_impl == "compiled" or (self.reducer_impl == "auto" and x.is_cuda)

    @property
    def architecture(self) -> dict[str, Any]:
        """What the weights compute that their shapes do not pin down (heads, LayerNorm epsilon, activation...)
        next to the sizes. Checkpoints record it and loading compares it (`check_architecture`): a preset edited
        after a checkpoint was saved fails loudly instead of loading into another model. Image size, vocabulary
        and modality type rows are build options (resized or checked at load), not part of it."""
        raise NotImplementedError

    @property
    def num_image_tokens(self) -> int:
        """Image tokens entering the first reducible layer at ``image_size`` (patches + image CLS)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def _active_schedule(self) -> ReducerSchedule | None:
        """The schedule if it reduces anything (re-checked: a schedule object may be edited after assignment)."""
        schedule = self._reducer
        if schedule is None or not schedule.is_active:
            return None
        schedule.check_depth(self.num_layers, f"{self.family} backbone")
        return schedule

    def _check_inputs(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, image_index: int
    ) -> None:
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, L); got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"batch sizes differ: {pixel_values.shape[0]} images, {input_ids.shape[0]} texts"
            )
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        if not 0 <= image_index < self.num_token_types - 1:
            raise ValueError(
                f"image_index={image_index} needs modality type id {image_index + 1}, but the backbone has "
                f"{self.num_token_types} type rows; build it with num_token_types={image_index + 2}"
            )
        if input_ids.shape[1] > self.text_position_limit:
            raise ValueError(
                f"text of {input_ids.shape[1]} tokens exceeds the {self.text_position_limit} positions of the "
                f"{self.family} text embeddings; truncate to max_text_len={self.max_text_len}"
            )

    def extra_repr(self) -> str:
        return (
            f"family={self.family}, reducer={self._reducer}, attn_impl={self.attn_impl}, "
            f"reducer_impl={self.reducer_impl}"
        )


ReducerImpl = Literal["auto", "eager", "compiled"]
REDUCER_IMPLS = ("auto", "eager", "compiled")


def check_reducer_impl(impl: str) -> ReducerImpl:
    if impl not in REDUCER_IMPLS:
        raise ValueError(f"reducer_impl must be one of {REDUCER_IMPLS}, got {impl!r}")
    return impl  # type: ignore[return-value]


def attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention logits will have: autocast's lower precision when it is on, else ``x.dtype``."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def reduction_bias(state: ReductionState, prop: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Key biases over the joint ``[text; image]`` sequence of ``state``: padding blocked, ``+ log size`` if ``prop``.

    Returns ``(bias32, bias)``: (B, N) fp32 for the importance softmax and (B, 1, 1, N) in ``dtype`` for the fused
    attention kernel (the same values; masked keys get ``dtype``'s most negative finite value).
    """
    blocked = torch.finfo(dtype).min
    if prop:
        bias32 = torch.where(state.real, state.size.float().log(), blocked)
    else:
        bias32 = torch.where(state.real, 0.0, blocked)
    return bias32, bias32.to(dtype)[:, None, None, :]


def attention_bias(
    mask: Tensor | None, size: Tensor | None, prop: bool, dtype: torch.dtype
) -> tuple[Tensor | None, Tensor | None]:
    """The (B, 1, 1, N) bias for the fused kernel and the (B, N) ``log size`` for `attention_probs`."""
    log_size = size_bias(size) if prop and size is not None else None
    return key_bias(mask, size if log_size is not None else None, dtype), log_size
