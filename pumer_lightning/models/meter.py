"""METER (Dou et al., 2022): CLIP ViT + RoBERTa + co-attention blocks, with PuMer reducers in the blocks.

Parts:

* text: transformers' `RobertaModel` (no pooler), then ``cross_modal_text_transform``;
* image: transformers' `CLIPVisionModel` used as the original METER uses OpenAI CLIP's visual tower: all tokens go
  through ``post_layernorm`` (CLIP's ``ln_post``), no projection; the tower has the original's 11 blocks
  (CLIP ViT-B/16 minus its last block), then ``cross_modal_image_transform``;
* modality type embeddings (text 0, images 1 and 2);
* co-attention blocks: a text and an image `CrossLayer` each (post-LN self-attention, cross-attention, FFN);
* two poolers (Linear + tanh on token 0); ``pooled = [text pooler ; image pooler]``.

Parameter names follow the original METER (``cross_modal_text_layers.0.crossattention.self.query`` ...), with
the two transformers towers under ``text_transformer.`` and ``vit_model.``.

Co-attention runs in the original METER's **parallel** order: both layers of block b read the outputs of block
b - 1 (PuMer's code made it sequential, docs/official_code_differences.md#b8). A reducer at block b:

1. text layer b runs self-attention and cross-attention (text queries over the image tokens of block b - 1);
2. the cross-attention's text-query probabilities give the image importance, its image keys (head mean) the
   image similarity, the text self-attention keys (head mean) the text similarity;
3. the image tokens are pruned and merged before image layer b consumes them, and the text tokens are merged
   before the text FFN;
4. image layer b then runs on the reduced image tokens and cross-attends to the text of block b - 1, as the
   parallel order requires. Block b + 1 sees both reduced streams.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from transformers import CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel

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
from .base import Backbone, BackboneOutput, ReducerImpl, attention_bias, attention_dtype, reduction_bias


@dataclass(frozen=True)
class MeterConfig:
    """Architecture of a METER backbone. Defaults: METER-CLIP16-RoBERTa at 288 px (docs/backbones.md)."""

    image_size: int = 288
    patch_size: int = 16
    vision_hidden: int = 768
    vision_layers: int = 11
    vision_heads: int = 12
    vision_intermediate: int = 3072
    vocab_size: int = 50265
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    text_max_positions: int = 514
    pad_token_id: int = 1
    hidden: int = 768
    cross_layers: int = 6
    cross_heads: int = 12
    cross_intermediate: int = 3072
    dropout: float = 0.1
    num_token_types: int = 2
    max_text_len: int = 40

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"MeterConfig.image_size {self.image_size} is not a multiple of {self.patch_size}"
            )
        if self.hidden % self.cross_heads:
            raise ValueError(f"MeterConfig.hidden {self.hidden} is not divisible by {self.cross_heads} heads")
        if self.num_token_types < 2:
            raise ValueError(f"MeterConfig.num_token_types must be >= 2, got {self.num_token_types}")

    def roberta(self) -> RobertaConfig:
        """RoBERTa-base as METER loads it (``roberta-base``: LayerNorm eps 1e-5, one token type)."""
        return RobertaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_hidden,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            intermediate_size=self.text_intermediate,
            max_position_embeddings=self.text_max_positions,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=self.pad_token_id,
            bos_token_id=0,
            eos_token_id=2,
        )

    def clip_vision(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.vision_hidden,
            intermediate_size=self.vision_intermediate,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )


def _init_bert_style(module: nn.Module) -> None:
    """METER's ``init_weights``: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _Projections(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class _ResidualNorm(nn.Module):
    """``LayerNorm(dropout(dense(h)) + residual)`` (BERT's SelfOutput / Output)."""

    def __init__(self, d_in: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.self = _Projections(hidden)
        self.output = _ResidualNorm(hidden, hidden, dropout)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


@dataclass
class CrossAttentionParts:
    """Tensors of a `CrossLayer.attend` call that the reducer needs, (B, H, *, D) each."""

    self_keys: Tensor  # keys of the layer's own stream (self-attention)
    cross_queries: Tensor  # the layer's queries in cross-attention
    cross_keys: Tensor  # the other stream's keys in cross-attention


class CrossLayer(nn.Module):
    """METER's BertCrossLayer: post-LN self-attention, cross-attention to the other stream, FFN.

    Split into `attend` and `feed_forward` so that a reducer can run between them.
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = heads
        self.attn_dropout = dropout
        self.attention = _Attention(hidden, dropout)
        self.crossattention = _Attention(hidden, dropout)
        self.intermediate = _Intermediate(hidden, intermediate)
        self.output = _ResidualNorm(intermediate, hidden, dropout)

    def attend(
        self, x: Tensor, other: Tensor, self_bias: Tensor | None, cross_bias: Tensor | None, impl: AttnImpl
    ) -> tuple[Tensor, CrossAttentionParts]:
        """Self-attention then cross-attention; (B, L, C) x and (B, M, C) other -> (B, L, C)."""
        p = self.attn_dropout if self.training else 0.0
        heads = self.num_heads
        proj = self.attention.self
        q, k, v = (split_heads(f(x), heads) for f in (proj.query, proj.key, proj.value))
        x = self.attention.output(merge_heads(attend(q, k, v, self_bias, p, impl)), x)
        proj = self.crossattention.self
        cq = split_heads(proj.query(x), heads)
        ck, cv = split_heads(proj.key(other), heads), split_heads(proj.value(other), heads)
        x = self.crossattention.output(merge_heads(attend(cq, ck, cv, cross_bias, p, impl)), x)
        return x, CrossAttentionParts(self_keys=k, cross_queries=cq, cross_keys=ck)

    def feed_forward(self, x: Tensor) -> Tensor:
        return self.output(self.intermediate(x), x)

    def forward(
        self, x: Tensor, other: Tensor, self_bias: Tensor | None, cross_bias: Tensor | None, impl: AttnImpl
    ) -> Tensor:
        return self.feed_forward(self.attend(x, other, self_bias, cross_bias, impl)[0])


class Pooler(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class MeterBackbone(Backbone):
    """METER with reducers at any set of its co-attention blocks.

    Args:
        config: the architecture.
        reducer: the reducer schedule; block ids are 0-based co-attention block indices (PuMer's doubled
            "0246" is ``[0, 1, 2, 3]``, its "246" is ``[1, 2, 3]``; docs/official_code_differences.md#b10).
        attn_impl: ``"sdpa"`` or ``"eager"`` (also applied to the RoBERTa and CLIP towers).
        reducer_impl: ``"auto"``, ``"eager"`` or ``"compiled"`` reduction steps (see `Backbone`).
    """

    family = "meter"
    image_preprocess = "clip"

    def __init__(
        self,
        config: MeterConfig,
        *,
        reducer: ReducerSchedule | None = None,
        attn_impl: AttnImpl = "sdpa",
        reducer_impl: ReducerImpl = "auto",
    ) -> None:
        super().__init__(attn_impl, reducer_impl)
        self.config = config
        self.text_transformer = RobertaModel(config.roberta(), add_pooling_layer=False)
        self.vit_model = CLIPVisionModel(config.clip_vision())
        self.text_transformer.set_attn_implementation(attn_impl)
        self.vit_model.set_attn_implementation(attn_impl)

        hidden = config.hidden
        self.cross_modal_text_transform = nn.Linear(config.text_hidden, hidden)
        self.cross_modal_image_transform = nn.Linear(config.vision_hidden, hidden)
        self.token_type_embeddings = nn.Embedding(config.num_token_types, hidden)
        layer_args = (hidden, config.cross_heads, config.cross_intermediate, config.dropout)
        self.cross_modal_image_layers = nn.ModuleList(
            CrossLayer(*layer_args) for _ in range(config.cross_layers)
        )
        self.cross_modal_text_layers = nn.ModuleList(
            CrossLayer(*layer_args) for _ in range(config.cross_layers)
        )
        self.cross_modal_image_pooler = Pooler(hidden)
        self.cross_modal_text_pooler = Pooler(hidden)
        for name, module in self.named_children():
            if name not in ("text_transformer", "vit_model"):
                module.apply(_init_bert_style)

        self.num_heads = config.cross_heads
        self.hidden_size = 2 * hidden
        self.head_width = 2 * hidden
        self.num_layers = config.cross_layers
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.num_token_types = config.num_token_types
        self.vocab_size = config.vocab_size
        self.pad_token_id = config.pad_token_id
        self.text_position_limit = config.text_max_positions - config.pad_token_id - 1
        self.max_text_len = min(config.max_text_len, self.text_position_limit)
        self.reducer = reducer

    @property
    def architecture(self) -> dict[str, Any]:
        build_options = ("image_size", "vocab_size", "num_token_types", "dropout", "max_text_len")
        return {k: v for k, v in dataclasses.asdict(self.config).items() if k not in build_options}

    def set_attn_impl(self, attn_impl: AttnImpl) -> None:
        """Switch the attention implementation of the co-attention blocks and both towers."""
        super().set_attn_impl(attn_impl)
        self.text_transformer.set_attn_implementation(attn_impl)
        self.vit_model.set_attn_implementation(attn_impl)

    # ---- towers -----------------------------------------------------------------------------------------------
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """RoBERTa states, (B, Lt, text_hidden).

        Position ids follow RoBERTa's rule (real tokens count up from ``pad_token_id + 1``, pads sit at
        ``pad_token_id``) but are taken from the attention mask rather than from ``input_ids != pad``, so a
        tokenizer whose pad id differs cannot shift them.
        """
        mask = attention_mask.long()
        position_ids = mask.cumsum(dim=1) * mask + self.config.pad_token_id
        return self.text_transformer(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids
        ).last_hidden_state

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """CLIP visual tower as METER uses it: all tokens through ``ln_post``; (B, 1 + patches, vision_hidden)."""
        tower = self.vit_model
        resize = tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size)
        h = tower.embeddings(pixel_values, interpolate_pos_encoding=resize)
        h = tower.pre_layrnorm(h)
        h = tower.encoder(inputs_embeds=h).last_hidden_state
        return tower.post_layernorm(h)

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
            pixel_values: (B, 3, H, W) CLIP-normalised images.
            input_ids: (B, Lt) RoBERTa token ids, ``<s>`` first; right padding with the pad id.
            attention_mask: (B, Lt) 1 for real tokens.
            image_index: the image gets modality type id ``1 + image_index`` (NLVR2: 0 and 1 for its two images).
            track_maps: record in the trace where each original patch went after every reduction.
        """
        self._check_inputs(pixel_values, input_ids, attention_mask, image_index)
        text_mask = (attention_mask != 0).long()
        x = self.cross_modal_text_transform(self.encode_text(input_ids, text_mask))
        y = self.cross_modal_image_transform(self.encode_image(pixel_values))
        types = self.token_type_embeddings.weight
        x = x + types[0]
        y = y + types[1 + image_index]

        schedule = self._active_schedule()
        state = ReductionState.init(y, x, text_mask, track_maps) if schedule is not None else None
        trace = ReductionTrace()
        dtype = attention_dtype(x)
        # (B, 1, 1, N) additive biases for keys of each stream: padding, and log(size) once tokens were merged
        text_bias, _ = attention_bias(text_mask, None, False, dtype)
        image_bias, image_bias32 = None, None
        for index, (text_layer, image_layer) in enumerate(
            zip(self.cross_modal_text_layers, self.cross_modal_image_layers)
        ):
            trace.record(index, y.shape[1], x.shape[1])
            plan = schedule.step(index, y.shape[1], x.shape[1]) if schedule is not None else None
            x_mid, parts = text_layer.attend(x, y, text_bias, image_bias, self.attn_impl)
            if plan is None:
                x_next = text_layer.feed_forward(x_mid)
                y_next = image_layer(y, x, image_bias, text_bias, self.attn_impl)
            else:
                assert state is not None and schedule is not None
                # ---- PuMer: reduce inside text layer b; image layer b consumes the reduced image tokens ----
                with record_function("pumer.reduce"):
                    scores, metric = self._reduction_inputs(
                        parts, image_layer, y, image_bias32, state, plan, schedule
                    )
                    state = replace(state, tokens=torch.cat([x_mid, y], dim=1), n_text=x_mid.shape[1])
                    state = reduce(
                        state, plan, scores=scores, metric=metric, compiled=self.reduce_compiled(x)
                    )
                    trace.record_maps(state)
                    bias32, bias = reduction_bias(state, schedule.prop_attn, dtype)
                    n_text = state.n_text
                    if schedule.prop_attn:
                        image_bias, image_bias32 = bias[..., n_text:], bias32[:, n_text:]
                x_next = text_layer.feed_forward(state.text)
                # parallel order: image layer b cross-attends to the text of block b - 1 (mask and sizes as they were)
                y_next = image_layer(state.image, x, image_bias, text_bias, self.attn_impl)
                text_bias = bias[..., :n_text]
                # ---- end PuMer ----
            x, y = x_next, y_next

        text_mask = state.text_mask if state is not None else text_mask
        pooled = torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], dim=-1)
        return BackboneOutput(pooled=pooled, text_states=x, text_mask=text_mask, image_states=y, trace=trace)

    @torch.no_grad()
    def _reduction_inputs(
        self,
        parts: CrossAttentionParts,
        image_layer: CrossLayer,
        image: Tensor,
        image_bias32: Tensor | None,
        state: ReductionState,
        plan: LayerPlan,
        schedule: ReducerSchedule,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Image importance and the head-averaged key metric ``[text; image]`` of a reduction in this block."""
        scores, cross_keys = None, parts.cross_keys
        if plan.n_prune or (schedule.partition == "score" and plan.n_merge):
            if schedule.importance == "text":
                # text queries of the text layer's cross-attention over the image keys (pre-dropout,
                # docs/official_code_differences.md#b7); the fp32 keys serve the similarity metric too
                cross_keys = fp32_contiguous(cross_keys)
                probs = attention_probs(parts.cross_queries, cross_keys, bias=image_bias32)
                scores = text_importance(probs, state.real[:, : state.n_text], normalize=False)
            elif schedule.importance == "cls":
                # the image CLS query of image layer b's self-attention over the image tokens entering it
                proj = image_layer.attention.self
                q = split_heads(proj.query(image[:, :1]), self.num_heads)
                k = split_heads(proj.key(image), self.num_heads)
                scores = cls_importance(attention_probs(q, k, bias=image_bias32))
            else:
                scores = random_importance(image.shape[0], image.shape[1], device=image.device)
        metric = None
        if plan.n_merge or plan.n_text_merge:
            metric = torch.cat([key_metric(parts.self_keys), key_metric(cross_keys)], dim=1)
        return scores, metric
