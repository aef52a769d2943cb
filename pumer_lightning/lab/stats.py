"""Accuracy with standard errors, paired differences, and both over training seeds.

Scores are per-example floats whose mean is the metric (1/0 for a right/wrong class, the soft VQA score of the
predicted answer). Every standard error here is the sample standard deviation (``n - 1``) over ``sqrt(n)``:

* `mean_se`: one list of scores; `accuracy`: overall, per type and on a subset of the types;
* `paired`: ``a - b`` on the same examples (the standard error of the per-example differences);
* `over_seeds` / `paired_over_seeds`: the mean over seeds, with a standard error that adds the seed-to-seed
  spread to the test-sample noise (`SE_RULE`);
* `summarize` / `paired_drop`: a logged metric next to the per-example scores that should reproduce it (``make
  tune``), falling back to the binomial standard error when they do not.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

#: How `over_seeds` and `paired_over_seeds` combine the two sources of uncertainty (quoted in reports).
SE_RULE = (
    "mean over seeds; standard error sqrt(se_seeds^2 + se_sample^2), where se_seeds is the standard deviation over "
    "seeds of the per-seed figure (accuracy, or paired difference seed s against seed s) divided by sqrt(S), and "
    "se_sample is the standard error over test examples of the seed-averaged per-example score (paired: of the "
    "seed-averaged per-example difference); single-model rows have se_seeds = 0"
)


def mean_se(xs: Sequence[float]) -> dict[str, float]:
    """``{"acc": mean, "se": sd / sqrt(n), "n": n}`` (NaN for no scores; se 0 for one)."""
    n = len(xs)
    if not n:
        return {"acc": float("nan"), "se": float("nan"), "n": 0}
    p = sum(xs) / n
    var = sum((x - p) ** 2 for x in xs) / max(n - 1, 1)
    return {"acc": p, "se": math.sqrt(var / n), "n": n}


def accuracy(
    scores: Sequence[float], types: Sequence[str], only: Sequence[str] | None = None
) -> dict[str, Any]:
    """`mean_se` overall (``all``), per type (``by_type``) and, with ``only``, on those types (``learned``)."""
    out: dict[str, Any] = {"all": mean_se(scores), "by_type": {}}
    for t in sorted(set(types)):
        out["by_type"][t] = mean_se([c for c, ty in zip(scores, types) if ty == t])
    if only is not None:
        out["learned"] = mean_se([c for c, ty in zip(scores, types) if ty in only])
    return out


def paired(
    a: Sequence[float], b: Sequence[float], types: Sequence[str], only: Sequence[str]
) -> dict[str, float]:
    """``a - b`` on the same examples (those of ``only``'s types) with its paired standard error."""
    pairs = [(x, y) for x, y, t in zip(a, b, types) if t in only]
    stat = mean_se([x - y for x, y in pairs])
    return {"diff": stat["acc"], "se": stat["se"], "n": stat["n"]}


def seed_se(values: Sequence[float]) -> float:
    """Standard error of the mean of per-seed values (sample sd / sqrt(S)); 0 for a single seed."""
    k = len(values)
    return statistics.stdev(values) / math.sqrt(k) if k > 1 else 0.0


def _with_seeds(stat: dict[str, Any], per_seed: list[float]) -> None:
    """Add the seed term to a sample-only ``stat`` (in place): ``se = sqrt(se_sample^2 + se_seeds^2)``."""
    stat["se_sample"] = stat["se"]
    stat["se_seeds"] = seed_se(per_seed)
    stat["se"] = math.sqrt(stat["se_sample"] ** 2 + stat["se_seeds"] ** 2)
    stat["per_seed"] = per_seed


def over_seeds(
    per_seed: Sequence[Sequence[float]], types: Sequence[str], only: Sequence[str] | None = None
) -> dict[str, Any]:
    """`accuracy` of a setting trained with several seeds (one score list per seed, same test examples).

    The figure is the mean over seeds. Its standard error combines the two sources of uncertainty:

        se = sqrt(se_seeds**2 + se_sample**2)
        se_seeds  = sd over seeds of the per-seed accuracies / sqrt(S)       (training noise: seed-to-seed spread)
        se_sample = sd over examples of the seed-averaged score / sqrt(n)    (test-sample noise)

    The seed term also carries part of the sampling noise, so the sum is conservative. With one seed it is
    `accuracy`'s standard error exactly.
    """
    mean = [sum(xs) / len(per_seed) for xs in zip(*per_seed)]
    out = accuracy(mean, types, only)
    groups = {"all": lambda t: True, **{t: (lambda t, u=t: t == u) for t in sorted(set(types))}}
    if only is not None:
        groups["learned"] = lambda t: t in only
    for name, keep in groups.items():
        accs = []
        for xs in per_seed:
            sel = [x for x, t in zip(xs, types) if keep(t)]
            accs.append(sum(sel) / len(sel) if sel else float("nan"))
        _with_seeds(out[name] if name in ("all", "learned") else out["by_type"][name], accs)
    return out


def paired_over_seeds(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], types: Sequence[str], only: Sequence[str]
) -> dict[str, Any]:
    """Mean over seeds of the paired difference a - b (seed s of ``a`` against seed s of ``b``, same examples).

    ``se = sqrt(se_seeds**2 + se_sample**2)``: ``se_seeds`` is the sd over seeds of the per-seed paired
    differences / sqrt(S); ``se_sample`` is the paired standard error over examples of the seed-averaged
    per-example difference. One side a single model (training-free) is compared with every seed of the other;
    one seed each: `paired`'s standard error exactly.
    """
    a, b = list(a), list(b)
    if len(b) == 1 and len(a) > 1:
        b = b * len(a)
    if len(a) == 1 and len(b) > 1:
        a = a * len(b)
    per = [paired(x, y, types, only)["diff"] for x, y in zip(a, b)]
    mean_a = [sum(xs) / len(a) for xs in zip(*a)]
    mean_b = [sum(ys) / len(b) for ys in zip(*b)]
    out: dict[str, Any] = paired(mean_a, mean_b, types, only)
    _with_seeds(out, per)
    out["seeds"] = len(per)
    return out


def summarize(value: float, scores: Sequence[float], examples: int) -> dict[str, Any]:
    """A logged metric ``value`` with its standard error: per-example when ``scores`` reproduce it (their mean
    within 1e-4), else binomial ``sqrt(p (1 - p) / n)`` over ``examples``; ``se_kind`` says which."""
    scores = list(scores)
    stat = mean_se(scores)
    if len(scores) > 1 and abs(stat["acc"] - value) < 1e-4:
        return {
            "value": value,
            "se": stat["se"],
            "n": len(scores),
            "se_kind": "per-example",
            "scores": scores,
        }
    n = max(1, len(scores) or examples)
    p = min(max(value, 0.0), 1.0)
    return {"value": value, "se": math.sqrt(p * (1 - p) / n), "n": n, "se_kind": "binomial", "scores": []}


def paired_drop(reference: dict[str, Any], result: dict[str, Any]) -> tuple[float, float]:
    """Drop in points of a `summarize` ``result`` against ``reference`` on the same examples, and its standard
    error: paired over examples when both have per-example scores, else from the two standard errors."""
    a, b = reference.get("scores") or [], result.get("scores") or []
    if len(a) == len(b) and len(a) > 1:
        stat = mean_se([x - y for x, y in zip(a, b)])
        return 100 * stat["acc"], 100 * stat["se"]
    drop = 100 * (reference["value"] - result["value"])
    return drop, 100 * math.hypot(reference["se"], result["se"])
