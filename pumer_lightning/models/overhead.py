"""Reducer overhead: one reduction step against one ViLT-B transformer layer, on the current device.

    python -m pumer_lightning.models.overhead [--batch 8] [--text 40] [--image 145] [--repeats 30]   (make overhead)

The reduction step is everything PuMer adds at a reduce layer: the text-query attention probabilities (the one
extra matmul and softmax, on the queries and keys the layer's attention has already projected), the importance
scores, pruning, image merging and text merging, at the released ViLT setting (keep 0.9, merge 0.3, text merge
0.2). The layer is transformers' own `ViltLayer` at ViLT-B size (it lives here, not in `reduce/`, which imports
nothing heavier than torch).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from pumer_lightning.command import Command
from pumer_lightning.reduce import ReducerSchedule, ReductionState, attention_probs, reduce, text_importance


def _median_ms(fn, repeats: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), statistics.pstdev(times)


def measure(batch: int = 8, n_text: int = 40, n_image: int = 145, repeats: int = 30, seed: int = 0) -> dict:
    from transformers import ViltConfig
    from transformers.models.vilt.modeling_vilt import ViltLayer

    torch.manual_seed(seed)
    config = ViltConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072)
    config._attn_implementation = "sdpa"
    layer = ViltLayer(config).eval()
    heads, head_dim = 12, 64
    n = n_text + n_image
    hidden = torch.randn(batch, n, 768)
    lengths = torch.randint(n_text // 2, n_text + 1, (batch,))
    lengths[0] = n_text
    text_mask = (torch.arange(n_text)[None] < lengths[:, None]).long()
    key_mask = torch.cat([text_mask, torch.ones(batch, n_image, dtype=torch.long)], dim=1)
    extended = (1.0 - key_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    query = layer.attention.attention.query
    key = layer.attention.attention.key
    schedule = ReducerSchedule.from_pumer(0.1, 0.3, 0.2, [0])
    plan = schedule.step(0, n_image, n_text)

    def run_layer():
        layer(hidden, attention_mask=extended)

    # the layer's own attention computes these projections; the reducer reuses them
    with torch.inference_mode():
        q = query(hidden[:, :n_text]).view(batch, n_text, heads, head_dim).transpose(1, 2)
        k = key(hidden).view(batch, n, heads, head_dim).transpose(1, 2)

    def run_reducer():
        # what a reduce layer adds: text-query probabilities, importance, and the reduction itself
        probs = attention_probs(q, k, key_mask)
        scores = text_importance(probs[..., n_text:], text_mask, normalize=False)
        state = ReductionState.init_joint(hidden, n_text, text_mask)
        reduce(state, plan, scores=scores, metric=k.mean(dim=1))

    with torch.inference_mode():
        layer_ms, layer_sd = _median_ms(run_layer, repeats)
        reducer_ms, reducer_sd = _median_ms(run_reducer, repeats)
    return {
        "batch": batch,
        "tokens": n,
        "threads": torch.get_num_threads(),
        "layer_ms": round(layer_ms, 3),
        "layer_ms_sd": round(layer_sd, 3),
        "reducer_ms": round(reducer_ms, 3),
        "reducer_ms_sd": round(reducer_sd, 3),
        "ratio": round(reducer_ms / layer_ms, 4),
        "plan": plan.__dict__,
    }


@dataclass
class OverheadArgs:
    """The sizes of `measure`'s run."""

    batch: int = 8
    """examples per batch"""
    text: int = 40
    """text tokens"""
    image: int = 145
    """image tokens (145: a 384 px image in 32 px patches, plus CLS)"""
    repeats: int = 30
    """timed calls of each (the median is reported)"""
    json: bool = False
    """print the raw result as JSON"""


def run_overhead(args: OverheadArgs) -> None:
    """Measure and print the layer's and the reduction step's times."""
    result = measure(args.batch, args.text, args.image, args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"ViLT-B layer ({result['tokens']} tokens, batch {result['batch']}, {result['threads']} threads): "
        f"{result['layer_ms']:.2f} ms (sd {result['layer_ms_sd']:.2f})\n"
        f"reduction step (keep 0.9, merge 0.3, text 0.2): {result['reducer_ms']:.2f} ms "
        f"(sd {result['reducer_ms_sd']:.2f})\n"
        f"overhead ratio reducer/layer: {result['ratio']:.3f}"
    )


COMMAND = Command(
    OverheadArgs, run_overhead, prog="python -m pumer_lightning.models.overhead", description=__doc__
)


def main(argv: list[str] | None = None) -> None:
    """``python -m pumer_lightning.models.overhead`` (``pumer overhead``, ``make overhead``)."""
    COMMAND.main(argv)


if __name__ == "__main__":
    main()
