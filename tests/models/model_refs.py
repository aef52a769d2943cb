"""Fixtures for the backbone tests: tiny inputs, synthetic original-format checkpoints, reference forwards.

The reference forwards are written from the original architectures (OpenAI CLIP's visual tower with fused
``in_proj`` attention, BERT-style cross layers, timm's ViT blocks with fused ``qkv``) and read the weights by
their original key names, so they share no code with `pumer_lightning.models`.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, RobertaModel
from transformers.models.bert.modeling_bert import BertEmbeddings

from pumer_lightning.models import MeterConfig


def make_inputs(backbone, lengths: tuple[int, ...] = (7, 4, 2), seed: int = 0, image_size: int | None = None):
    """Images and right-padded texts of the given real lengths (BERT pad 0 for ViLT, RoBERTa pad 1 for METER)."""
    g = torch.Generator().manual_seed(seed)
    size = image_size or backbone.image_size
    batch, length = len(lengths), max(lengths)
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    vocab = backbone.config.vocab_size
    input_ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    input_ids[:, 0] = 0 if backbone.family == "meter" else 2  # <s> / a [CLS]-like id
    input_ids[mask == 0] = 1 if backbone.family == "meter" else 0
    return pixel_values, input_ids, mask


# ---- synthetic original checkpoints -------------------------------------------------------------------------------
class _Random:
    """Random tensors with sensible scales, from one generator."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def weight(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.g) / math.sqrt(shape[-1] if len(shape) > 1 else 1)

    def bias(self, n: int) -> Tensor:
        return 0.1 * torch.randn(n, generator=self.g)

    def norm(self, n: int) -> tuple[Tensor, Tensor]:
        return 1 + 0.1 * torch.randn(n, generator=self.g), self.bias(n)

    def embed(self, *shape: int) -> Tensor:
        return 0.5 * torch.randn(*shape, generator=self.g)


def _linear(sd: dict, rnd: _Random, name: str, d_out: int, d_in: int) -> None:
    sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd.weight(d_out, d_in), rnd.bias(d_out)


def _norm(sd: dict, rnd: _Random, name: str, n: int) -> None:
    sd[f"{name}.weight"], sd[f"{name}.bias"] = rnd.norm(n)


def _classifier(sd: dict, rnd: _Random, name: str, d_in: int, width: int, n_out: int) -> None:
    _linear(sd, rnd, f"{name}.0", width, d_in)
    _norm(sd, rnd, f"{name}.1", width)
    _linear(sd, rnd, f"{name}.3", n_out, width)


def original_meter_state(
    cfg: MeterConfig, heads: tuple[str, ...] = ("vqa",), num_answers: int = 11, seed: int = 0
) -> dict[str, Tensor]:
    """Every key of an original METER-CLIP16-RoBERTa Lightning state dict (docs/backbones.md), random values."""
    rnd = _Random(seed)
    sd: dict[str, Tensor] = {}
    roberta = RobertaModel(cfg.roberta(), add_pooling_layer=True)
    for key, value in roberta.state_dict().items():
        if key.endswith("LayerNorm.weight"):
            value = rnd.norm(value.shape[0])[0]
        elif value.dim() == 1:
            value = rnd.bias(value.shape[0])
        else:
            value = rnd.weight(*value.shape)
        sd[f"text_transformer.{key}"] = value
    sd["text_transformer.embeddings.position_ids"] = torch.arange(cfg.text_max_positions)[None]

    w, inter, patch = cfg.vision_hidden, cfg.vision_intermediate, cfg.patch_size
    grid = cfg.image_size // patch
    v = "vit_model.visual."
    sd[v + "conv1.weight"] = rnd.weight(w, 3, patch, patch) / patch
    sd[v + "class_embedding"] = rnd.embed(w)
    sd[v + "positional_embedding"] = rnd.embed(grid * grid + 1, w)
    _norm(sd, rnd, v + "ln_pre", w)
    for i in range(cfg.vision_layers):
        b = f"{v}transformer.resblocks.{i}."
        sd[b + "attn.in_proj_weight"], sd[b + "attn.in_proj_bias"] = rnd.weight(3 * w, w), rnd.bias(3 * w)
        _linear(sd, rnd, b + "attn.out_proj", w, w)
        _norm(sd, rnd, b + "ln_1", w)
        _linear(sd, rnd, b + "mlp.c_fc", inter, w)
        _linear(sd, rnd, b + "mlp.c_proj", w, inter)
        _norm(sd, rnd, b + "ln_2", w)
    _norm(sd, rnd, v + "ln_post", w)
    # CLIP's text parts, unused by METER but present in its checkpoints
    sd["vit_model.token_embedding.weight"] = rnd.embed(50, w)
    sd["vit_model.positional_embedding"] = rnd.embed(8, w)
    _norm(sd, rnd, "vit_model.ln_final", w)

    h, ci = cfg.hidden, cfg.cross_intermediate
    _linear(sd, rnd, "cross_modal_text_transform", h, cfg.text_hidden)
    _linear(sd, rnd, "cross_modal_image_transform", h, cfg.vision_hidden)
    sd["token_type_embeddings.weight"] = rnd.embed(2, h)
    for stream in ("text", "image"):
        for i in range(cfg.cross_layers):
            p = f"cross_modal_{stream}_layers.{i}."
            for attn in ("attention", "crossattention"):
                for proj in ("query", "key", "value"):
                    _linear(sd, rnd, f"{p}{attn}.self.{proj}", h, h)
                _linear(sd, rnd, f"{p}{attn}.output.dense", h, h)
                _norm(sd, rnd, f"{p}{attn}.output.LayerNorm", h)
            _linear(sd, rnd, p + "intermediate.dense", ci, h)
            _linear(sd, rnd, p + "output.dense", h, ci)
            _norm(sd, rnd, p + "output.LayerNorm", h)
        _linear(sd, rnd, f"cross_modal_{stream}_pooler.dense", h, h)

    sd["mlm_score.bias"] = rnd.bias(cfg.vocab_size)
    _linear(sd, rnd, "mlm_score.transform.dense", h, h)
    _norm(sd, rnd, "mlm_score.transform.LayerNorm", h)
    sd["mlm_score.decoder.weight"] = rnd.weight(cfg.vocab_size, h)
    _linear(sd, rnd, "itm_score.fc", 2, 2 * h)
    if "vqa" in heads:
        _classifier(sd, rnd, "vqa_classifier", 2 * h, 2 * h, num_answers)
    if "nlvr2" in heads:
        _classifier(sd, rnd, "nlvr2_classifier", 4 * h, 2 * h, 2)
    if "snli" in heads:
        _classifier(sd, rnd, "snli_classifier", 2 * h, 2 * h, 3)
    if "irtr" in heads:
        _linear(sd, rnd, "rank_output", 1, 2 * h)
    return sd


def _ln(x: Tensor, sd: dict, name: str, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _lin(x: Tensor, sd: dict, name: str) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _bert_attention(x: Tensor, ctx: Tensor, ext_mask: Tensor, sd: dict, p: str, heads: int) -> Tensor:
    batch, n, c = x.shape
    d = c // heads

    def split(t: Tensor) -> Tensor:
        return t.view(batch, t.shape[1], heads, d).permute(0, 2, 1, 3)

    q, k, v = (
        split(_lin(x, sd, p + "self.query")),
        split(_lin(ctx, sd, p + "self.key")),
        split(_lin(ctx, sd, p + "self.value")),
    )
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + ext_mask
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(batch, n, c)
    return _ln(_lin(out, sd, p + "output.dense") + x, sd, p + "output.LayerNorm", 1e-12)


def _bert_cross_layer(x, ctx, x_mask, ctx_mask, sd, p, heads):
    x = _bert_attention(x, x, x_mask, sd, p + "attention.", heads)
    x = _bert_attention(x, ctx, ctx_mask, sd, p + "crossattention.", heads)
    h = F.gelu(_lin(x, sd, p + "intermediate.dense"))
    return _ln(_lin(h, sd, p + "output.dense") + x, sd, p + "output.LayerNorm", 1e-12)


def meter_reference(sd: dict, cfg: MeterConfig, pixel_values, input_ids, mask, image_index: int = 0):
    """The original METER ``infer`` (parallel co-attention) from an original-format state dict; returns
    (pooled, text_states, image_states)."""
    roberta = RobertaModel(cfg.roberta(), add_pooling_layer=True)
    roberta.set_attn_implementation("eager")
    prefix = "text_transformer."
    roberta.load_state_dict(
        {
            k[len(prefix) :]: v
            for k, v in sd.items()
            if k.startswith(prefix) and not k.endswith("position_ids")
        }
    )
    roberta.eval()
    text = roberta(input_ids=input_ids, attention_mask=mask).last_hidden_state

    v = "vit_model.visual."
    w, heads = cfg.vision_hidden, cfg.vision_heads
    x = F.conv2d(pixel_values, sd[v + "conv1.weight"], stride=cfg.patch_size).flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd[v + "class_embedding"].expand(x.shape[0], 1, w), x], dim=1)
        + sd[v + "positional_embedding"]
    )
    x = _ln(x, sd, v + "ln_pre", 1e-5).transpose(0, 1)  # (N, B, W), as CLIP runs it
    for i in range(cfg.vision_layers):
        b = f"{v}transformer.resblocks.{i}."
        h = _ln(x, sd, b + "ln_1", 1e-5)
        attn, _ = F.multi_head_attention_forward(
            h,
            h,
            h,
            w,
            heads,
            sd[b + "attn.in_proj_weight"],
            sd[b + "attn.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            sd[b + "attn.out_proj.weight"],
            sd[b + "attn.out_proj.bias"],
            training=False,
            need_weights=False,
        )
        x = x + attn
        h = _lin(_ln(x, sd, b + "ln_2", 1e-5), sd, b + "mlp.c_fc")
        x = x + _lin(h * torch.sigmoid(1.702 * h), sd, b + "mlp.c_proj")
    image = _ln(x.transpose(0, 1), sd, v + "ln_post", 1e-5)

    types = sd["token_type_embeddings.weight"]
    x = _lin(text, sd, "cross_modal_text_transform") + types[0]
    y = _lin(image, sd, "cross_modal_image_transform") + types[1 + image_index]
    text_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
    image_mask = torch.zeros(y.shape[0], 1, 1, y.shape[1])
    for i in range(cfg.cross_layers):
        x1 = _bert_cross_layer(
            x, y, text_mask, image_mask, sd, f"cross_modal_text_layers.{i}.", cfg.cross_heads
        )
        y1 = _bert_cross_layer(
            y, x, image_mask, text_mask, sd, f"cross_modal_image_layers.{i}.", cfg.cross_heads
        )
        x, y = x1, y1
    pooled = torch.cat(
        [
            torch.tanh(_lin(x[:, 0], sd, "cross_modal_text_pooler.dense")),
            torch.tanh(_lin(y[:, 0], sd, "cross_modal_image_pooler.dense")),
        ],
        dim=-1,
    )
    return pooled, x, y


def original_vilt_state(config, heads: tuple[str, ...] = ("vqa",), num_answers: int = 11, seed: int = 0):
    """Every key of an original (timm-style) ViLT Lightning state dict, random values."""
    rnd = _Random(seed)
    c, inter, patch = config.hidden_size, config.intermediate_size, config.patch_size
    grid = config.image_size // patch
    sd: dict[str, Tensor] = {
        "text_embeddings.word_embeddings.weight": rnd.embed(config.vocab_size, c),
        "text_embeddings.position_embeddings.weight": rnd.embed(config.max_position_embeddings, c),
        "text_embeddings.token_type_embeddings.weight": rnd.embed(2, c),
        "text_embeddings.position_ids": torch.arange(config.max_position_embeddings)[None],
        "token_type_embeddings.weight": rnd.embed(2, c),
        "transformer.cls_token": rnd.embed(1, 1, c),
        "transformer.pos_embed": rnd.embed(1, grid * grid + 1, c),
        "transformer.patch_embed.proj.weight": rnd.weight(c, 3, patch, patch) / patch,
        "transformer.patch_embed.proj.bias": rnd.bias(c),
    }
    _norm(sd, rnd, "text_embeddings.LayerNorm", c)
    for i in range(config.num_hidden_layers):
        b = f"transformer.blocks.{i}."
        _norm(sd, rnd, b + "norm1", c)
        _linear(sd, rnd, b + "attn.qkv", 3 * c, c)
        _linear(sd, rnd, b + "attn.proj", c, c)
        _norm(sd, rnd, b + "norm2", c)
        _linear(sd, rnd, b + "mlp.fc1", inter, c)
        _linear(sd, rnd, b + "mlp.fc2", c, inter)
    _norm(sd, rnd, "transformer.norm", c)
    _linear(sd, rnd, "pooler.dense", c, c)
    _linear(sd, rnd, "itm_score.fc", 2, c)
    sd["mlm_score.bias"] = rnd.bias(config.vocab_size)
    _linear(sd, rnd, "mlm_score.transform.dense", c, c)
    _norm(sd, rnd, "mlm_score.transform.LayerNorm", c)
    sd["mlm_score.decoder.weight"] = rnd.weight(config.vocab_size, c)
    if "vqa" in heads:
        _classifier(sd, rnd, "vqa_classifier", c, 2 * c, num_answers)
    if "nlvr2" in heads:
        _classifier(sd, rnd, "nlvr2_classifier", 2 * c, 2 * c, 2)
    if "irtr" in heads:
        _linear(sd, rnd, "rank_output", 1, c)
    return sd


def vilt_reference(
    sd: dict, config, pixel_values, input_ids, mask, image_index: int = 0, block_eps: float = 1e-6
):
    """The original ViLT ``infer`` (timm blocks, fused qkv) from an original-format state dict -> pooled."""
    length = input_ids.shape[1]
    t = "text_embeddings."
    text = (
        sd[t + "word_embeddings.weight"][input_ids]
        + sd[t + "position_embeddings.weight"][:length]
        + sd[t + "token_type_embeddings.weight"][0]
    )
    text = _ln(text, sd, t + "LayerNorm", 1e-12) + sd["token_type_embeddings.weight"][0]
    x = (
        F.conv2d(
            pixel_values,
            sd["transformer.patch_embed.proj.weight"],
            sd["transformer.patch_embed.proj.bias"],
            stride=config.patch_size,
        )
        .flatten(2)
        .transpose(1, 2)
    )
    x = (
        torch.cat([sd["transformer.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
        + sd["transformer.pos_embed"]
    )
    image = x + sd["token_type_embeddings.weight"][1 + image_index]
    x = torch.cat([text, image], dim=1)
    keys = torch.cat([mask.bool(), torch.ones(image.shape[:2], dtype=torch.bool)], dim=1)
    heads = config.num_attention_heads
    batch, n, c = x.shape
    for i in range(config.num_hidden_layers):
        b = f"transformer.blocks.{i}."
        qkv = _lin(_ln(x, sd, b + "norm1", block_eps), sd, b + "attn.qkv")
        q, k, v = qkv.reshape(batch, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
        attn = attn.masked_fill(~keys[:, None, None, :], float("-inf")).softmax(-1)
        x = x + _lin((attn @ v).transpose(1, 2).reshape(batch, n, c), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", block_eps), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    x = _ln(x, sd, "transformer.norm", block_eps)
    return torch.tanh(_lin(x[:, 0], sd, "pooler.dense"))


# ---- original ViLT as modules (its vilt_module.py + timm-derived vision_transformer.py, written afresh) ----------
class TimmAttention(nn.Module):
    """timm's ViT attention as original ViLT defines it: fused ``qkv``, padded keys masked with -inf."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)  # qkv_bias=True (vit_base_patch32_384)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        batch, n, c = x.shape
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, n, c))


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    """A pre-LN ViT block; ``norm_layer`` is ViLT's ``partial(nn.LayerNorm, eps=1e-6)``."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, norm_layer) -> None:
        super().__init__()
        self.norm1, self.attn = norm_layer(dim), TimmAttention(dim, heads)
        self.norm2, self.mlp = norm_layer(dim), TimmMlp(dim, mlp_hidden)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class TimmVisionTransformer(nn.Module):
    """The parts of ViLT's ``VisionTransformer`` that its ``infer`` uses, initialised as timm does."""

    def __init__(self, config, eps: float = 1e-6) -> None:
        super().__init__()
        c, grid = config.hidden_size, config.image_size // config.patch_size
        norm_layer = partial(nn.LayerNorm, eps=eps)
        self.patch_embed = TimmPatchEmbed(c, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, c))
        self.blocks = nn.ModuleList(
            TimmBlock(c, config.num_attention_heads, config.intermediate_size, norm_layer)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = norm_layer(c)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def visual_embed(self, pixel_values: Tensor) -> Tensor:
        """Patches in raster order: at the trained size without padding the original's position interpolation is
        the identity and its patch sampling only reorders the image tokens, which attention does not see."""
        x = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed


def _vilt_init(module: nn.Module) -> None:
    """Original ViLT's ``objectives.init_weights``."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, 0.02)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


class OriginalVilt(nn.Module):
    """Original ViLT (``ViLTransformerSS``) at any size, with its module names, so that ``state_dict()`` is an
    original-layout checkpoint: BERT embeddings from transformers (LayerNorm eps 1e-12), timm blocks (1e-6), and a
    VQA head (``nn.LayerNorm`` default 1e-5) when ``num_answers`` is given."""

    def __init__(self, config, num_answers: int | None = None, block_eps: float = 1e-6) -> None:
        super().__init__()
        c = config.hidden_size
        bert = BertConfig(
            vocab_size=config.vocab_size,
            hidden_size=c,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position_embeddings,
        )
        self.text_embeddings = BertEmbeddings(bert)
        self.token_type_embeddings = nn.Embedding(2, c)
        self.transformer = TimmVisionTransformer(config, block_eps)
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(c, c)
        for part in (self.text_embeddings, self.token_type_embeddings, self.pooler):
            part.apply(_vilt_init)
        if num_answers is not None:
            self.vqa_classifier = nn.Sequential(
                nn.Linear(c, 2 * c), nn.LayerNorm(2 * c), nn.GELU(), nn.Linear(2 * c, num_answers)
            )
            self.vqa_classifier.apply(_vilt_init)

    def forward(
        self, pixel_values: Tensor, input_ids: Tensor, mask: Tensor, image_index: int = 0
    ) -> tuple[Tensor, Tensor]:
        """``infer``'s pooled features (``cls_feats``) and final token states ``[text ; image CLS ; patches]``."""
        types = self.token_type_embeddings.weight
        text = self.text_embeddings(input_ids=input_ids) + types[0]
        image = self.transformer.visual_embed(pixel_values) + types[1 + image_index]
        x = torch.cat([text, image], dim=1)
        keep = torch.cat([mask.bool(), torch.ones(image.shape[:2], dtype=torch.bool)], dim=1)
        for block in self.transformer.blocks:
            x = block(x, keep)
        x = self.transformer.norm(x)
        return torch.tanh(self.pooler.dense(x[:, 0])), x
