"""ViLT (Kim et al., 2021) on transformers' ViLT modules, with PuMer reducers between attention and MLP.

The parameters are transformers' own `ViltEmbeddings`, `ViltLayer`, final LayerNorm and `ViltPooler`, under the
key names of `transformers.ViltModel`, so a local HF ViLT directory (``dandelin/vilt-b32-*``) loads as it is.
What we own is the forward pass:

* patches are embedded in raster order (HF's `visual_embed` shuffles them at random on every call), which gives
  each image token a fixed original patch index for the reducer's patch maps;
* every layer runs `scaled_dot_product_attention` (or an explicit softmax for parity tests);
* at a scheduled layer the reducer runs after attention + residual and before the MLP (PuMer's placement), with
  importance from the text-query rows of that layer's attention, recomputed as one small matmul + softmax.

Sequence layout: ``[text (Lt) ; image CLS ; patches]``; the pooler reads the text [CLS] at position 0.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function
from transformers import ViltConfig, ViltModel
from transformers.models.vilt.modeling_vilt import ViltLayer

from pumer_lightning.reduce import (
    LayerPlan,
    ReducerSchedule,
    ReductionState,
    ReductionTrace,
    attention_probs,
    cls_importance,
    fp32_contiguous,
    key_metric,
    random_importance,
    reduce,
    text_importance,
)

from .attention import AttnImpl, attend, merge_heads, split_heads
from .base import Backbone, BackboneOutput, ReducerImpl, attention_dtype, reduction_bias

#: the `ViltConfig` fields a checkpoint's weights depend on beyond their shapes (`Backbone.architecture`)
VILT_ARCHITECTURE = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "qkv_bias",
)


class ViltBackbone(Backbone):
    """ViLT with reducers at any set of its transformer blocks.

    Args:
        config: a `transformers.ViltConfig` (copied, never mutated). ``layer_norm_eps`` applies to every LayerNorm
            except the text embeddings' when the config carries ``text_layer_norm_eps`` (converted original ViLT
            checkpoints: 1e-6 and 1e-12, as timm's blocks and BERT's embeddings had).
        max_text_len: default truncation length for the data pipeline (at most the text position table).
        reducer: the reducer schedule; block ids are 0-based indices of ``encoder.layer``.
        attn_impl: ``"sdpa"`` or ``"eager"``.
        reducer_impl: ``"auto"``, ``"eager"`` or ``"compiled"`` reduction steps (see `Backbone`).
    """

    family = "vilt"
    image_preprocess = "vilt"

    def __init__(
        self,
        config: ViltConfig,
        *,
        max_text_len: int | None = None,
        reducer: ReducerSchedule | None = None,
        attn_impl: AttnImpl = "sdpa",
        reducer_impl: ReducerImpl = "auto",
    ) -> None:
        super().__init__(attn_impl, reducer_impl)
        config = copy.deepcopy(config)
        for name in ("image_size", "patch_size"):
            if not isinstance(getattr(config, name), int):
                raise ValueError(f"ViltBackbone needs a square integer {name}, got {getattr(config, name)!r}")
        hf = ViltModel(config, add_pooling_layer=True)  # transformers' modules and weight init
        self.config = hf.config
        self.embeddings = hf.embeddings
        text_eps = getattr(config, "text_layer_norm_eps", None)
        if text_eps is not None:  # original ViLT: BERT's 1e-12 here, timm's 1e-6 everywhere else
            self.embeddings.text_embeddings.LayerNorm.eps = float(text_eps)
        self.encoder = hf.encoder
        self.layernorm = hf.layernorm
        self.pooler = hf.pooler

        self.hidden_size = config.hidden_size
        self.head_width = 2 * config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.num_token_types = config.modality_type_vocab_size
        self.vocab_size = config.vocab_size
        self.pad_token_id = 0 if config.pad_token_id is None else config.pad_token_id  # BERT's [PAD]
        self.text_position_limit = config.max_position_embeddings
        self.max_text_len = min(
            max_text_len or config.max_position_embeddings, config.max_position_embeddings
        )
        self.reducer = reducer

    @property
    def architecture(self) -> dict[str, Any]:
        c = self.config
        text_eps = self.embeddings.text_embeddings.LayerNorm.eps
        return {**{k: getattr(c, k) for k in VILT_ARCHITECTURE}, "text_layer_norm_eps": text_eps}

    # ---- embeddings -------------------------------------------------------------------------------------------
    def embed_image(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + (H/P)(W/P), C): image CLS, then patches in raster order, with positions.

        Position embeddings are resized bilinearly (align_corners=True) when the grid differs from the one the
        model was built for, as transformers' ViLT does.
        """
        emb = self.embeddings
        patches = emb.patch_embeddings(pixel_values)  # (B, C, gh, gw)
        batch, channels, grid_h, grid_w = patches.shape
        grid = self.image_size // self.patch_size
        pos = emb.position_embeddings[:, 1:].transpose(1, 2).reshape(1, channels, grid, grid)
        if (grid_h, grid_w) != (grid, grid):
            pos = F.interpolate(pos, size=(grid_h, grid_w), mode="bilinear", align_corners=True)
        patches = patches.flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
        cls = emb.cls_token.expand(batch, -1, -1) + emb.position_embeddings[:, :1]
        return emb.dropout(torch.cat([cls, patches], dim=1))

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_index: int = 0,
        track_maps: bool = False,
    ) -> BackboneOutput:
        """Encode an image-text pair.

        Args:
            pixel_values: (B, 3, H, W) normalised images (H, W multiples of the patch size).
            input_ids: (B, Lt) BERT token ids, [CLS] first; right padding.
            attention_mask: (B, Lt) 1 for real tokens.
            image_index: the image gets modality type id ``1 + image_index`` (NLVR2: 0 and 1 for its two images).
            track_maps: record in the trace where each original patch went after every reduction.
        """
        self._check_inputs(pixel_values, input_ids, attention_mask, image_index)
        emb = self.embeddings
        text = emb.text_embeddings(input_ids=input_ids)
        text = text + emb.token_type_embeddings.weight[0]
        image = self.embed_image(pixel_values) + emb.token_type_embeddings.weight[1 + image_index]

        schedule = self._active_schedule()
        n_text = text.shape[1]
        x = torch.cat([text, image], dim=1)  # (B, Lt + Ni, C)
        state = ReductionState.init_joint(x, n_text, attention_mask, track_maps)
        trace = ReductionTrace()

        dtype = attention_dtype(x)
        key_bias32, bias = reduction_bias(state, False, dtype)
        for index, layer in enumerate(self.encoder.layer):
            n_image = x.shape[1] - n_text
            trace.record(index, n_image, n_text)
            plan = schedule.step(index, n_image, n_text) if schedule is not None else None
            x, state = self._layer(layer, x, n_text, bias, key_bias32, state, plan, schedule)
            if plan is not None:
                trace.record_maps(state)
                n_text = state.n_text
                # proportional attention from the first reduction on: + log(size) on every key
                key_bias32, bias = reduction_bias(state, schedule.prop_attn, dtype)

        x = self.layernorm(x)
        return BackboneOutput(
            pooled=self.pooler(x),
            text_states=x[:, :n_text],
            text_mask=state.text_mask,
            image_states=x[:, n_text:],
            trace=trace,
        )

    def _layer(
        self,
        layer: ViltLayer,
        x: Tensor,
        n_text: int,
        bias: Tensor | None,
        key_bias32: Tensor,
        state: ReductionState,
        plan: LayerPlan | None,
        schedule: ReducerSchedule | None,
    ) -> tuple[Tensor, ReductionState]:
        """One pre-LN ViLT block; the reducer (if ``plan``) runs after attention + residual, before the MLP."""
        h = layer.layernorm_before(x)
        attn = layer.attention.attention
        q = split_heads(attn.query(h), self.num_heads)  # (B, H, N, D)
        k = split_heads(attn.key(h), self.num_heads)
        v = split_heads(attn.value(h), self.num_heads)
        dropout_p = attn.dropout.p if self.training else 0.0
        context = attend(q, k, v, bias, dropout_p, self.attn_impl)
        x = x + layer.attention.output(merge_heads(context), h)

        # ---- PuMer: reduce between attention and MLP ----
        if plan is not None:
            assert schedule is not None
            with record_function("pumer.reduce"):
                scores, metric = self._reduction_inputs(q, k, n_text, key_bias32, state, plan, schedule)
                state = reduce(
                    replace(state, tokens=x),
                    plan,
                    scores=scores,
                    metric=metric,
                    compiled=self.reduce_compiled(x),
                )
            x = state.tokens
        # ---- end PuMer ----

        h = layer.layernorm_after(x)
        return layer.output(layer.intermediate(h), x), state

    @torch.no_grad()
    def _reduction_inputs(
        self,
        q: Tensor,
        k: Tensor,
        n_text: int,
        key_bias32: Tensor,
        state: ReductionState,
        plan: LayerPlan,
        schedule: ReducerSchedule,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Importance of the image tokens and the head-averaged keys used as the similarity metric.

        Selection carries no gradient (top-k indices and matching never do), so none of this is recorded.
        """
        scores, keys = None, k
        if plan.n_prune or (schedule.partition == "score" and plan.n_merge):
            if schedule.importance == "text":
                # text queries over all keys (padded keys masked), then the image columns; the fp32 keys serve the
                # similarity metric too
                keys = fp32_contiguous(k)
                probs = attention_probs(q[:, :, :n_text], keys, bias=key_bias32)[..., n_text:]
                scores = text_importance(probs, state.real[:, :n_text], normalize=False)
            elif schedule.importance == "cls":
                keys = fp32_contiguous(k)
                probs = attention_probs(q[:, :, n_text : n_text + 1], keys, bias=key_bias32)[..., n_text:]
                scores = cls_importance(probs)
            else:
                scores = random_importance(q.shape[0], k.shape[2] - n_text, device=q.device)
        metric = key_metric(keys) if (plan.n_merge or plan.n_text_merge) else None
        return scores, metric


def vilt_config(
    *,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    intermediate_size: int = 3072,
    image_size: int = 384,
    patch_size: int = 32,
    vocab_size: int = 30522,
    max_position_embeddings: int = 40,
    num_token_types: int = 2,
) -> ViltConfig:
    """A `ViltConfig` built in code (no hub access); defaults are ViLT-B/32 (``dandelin/vilt-b32-*``)."""
    return ViltConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        image_size=image_size,
        patch_size=patch_size,
        max_position_embeddings=max_position_embeddings,
        modality_type_vocab_size=num_token_types,
    )
