"""The search itself, as plain functions on numbers: rung sizes, Pareto ranks, survivors, the recommendation.

Successive halving on two objectives. Every candidate is timed once (cheap) and scored on a small prefix of the
validation split; the survivors of a rung, ``ceil(n / eta)`` of them chosen by non-dominated sorting on
(accuracy, speed) with crowding distance breaking ties inside a front (as NSGA-II does), go on to a prefix
``eta`` times longer, and the last rung is the whole split. Nothing here touches a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Objective = tuple[float, float]
"""(accuracy, speed): both higher is better."""


def rung_batches(total_batches: int, n_candidates: int, eta: int, min_finalists: int) -> list[int]:
    """Batches of the split each rung scores on: ``total / eta^k`` rounded up, for as many rungs as halving
    ``n_candidates`` down to about ``min_finalists`` takes; the last rung is the whole split. Equal sizes merge."""
    if total_batches < 1:
        raise ValueError(f"the split has no batches ({total_batches})")
    if eta < 2:
        raise ValueError(f"--eta must be >= 2, got {eta}")
    halvings = 0
    n = n_candidates
    while n > max(1, min_finalists) * eta:
        n = math.ceil(n / eta)
        halvings += 1
    sizes = [max(1, math.ceil(total_batches / eta**k)) for k in range(halvings, -1, -1)]
    return sorted(set(sizes))


def dominates(a: Objective, b: Objective) -> bool:
    """``a`` is at least as good as ``b`` on both objectives and better on one."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_ranks(values: Sequence[Objective]) -> list[int]:
    """Non-dominated sorting: 0 for the Pareto front, 1 for the front of what remains, and so on."""
    ranks = [-1] * len(values)
    remaining = set(range(len(values)))
    rank = 0
    while remaining:
        front = {
            i for i in remaining if not any(dominates(values[j], values[i]) for j in remaining if j != i)
        }
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


def crowding(values: Sequence[Objective], members: Sequence[int]) -> dict[int, float]:
    """NSGA-II crowding distance of ``members`` (indices into ``values``) within their front: the ends of the
    front are infinitely far, inner points by the normalised gap between their neighbours."""
    out = {i: 0.0 for i in members}
    for axis in range(2):
        order = sorted(members, key=lambda i: values[i][axis])
        span = values[order[-1]][axis] - values[order[0]][axis]
        out[order[0]] = out[order[-1]] = math.inf
        for pos in range(1, len(order) - 1):
            if span > 0:
                out[order[pos]] += (values[order[pos + 1]][axis] - values[order[pos - 1]][axis]) / span
    return out


def survivors(values: Sequence[Objective], k: int, keep: Sequence[int] = ()) -> list[int]:
    """Indices of the ``k`` best by Pareto rank, then crowding distance; ``keep`` always survives (and counts)."""
    ranks = pareto_ranks(values)
    chosen = list(dict.fromkeys(keep))
    for rank in sorted(set(ranks)):
        members = [i for i, r in enumerate(ranks) if r == rank and i not in chosen]
        if not members:
            continue
        distance = crowding(values, members)
        members.sort(key=lambda i: (-distance[i], -values[i][0], i))
        chosen += members[: max(0, k - len(chosen))]
        if len(chosen) >= k:
            break
    return chosen


def on_front(values: Sequence[Objective]) -> list[bool]:
    """Whether each point is on the Pareto front (no other point dominates it)."""
    return [r == 0 for r in pareto_ranks(values)]


def within_budget(drop: float, drop_se: float, max_drop: float, z: float) -> bool:
    """The accuracy budget, in points: ``drop + z * SE(drop) <= max_drop`` (z = 0: the point estimate)."""
    return drop + z * drop_se <= max_drop + 1e-9


def recommend(
    candidates: Sequence[tuple[str, float, float, float, float]], max_drop: float, z: float
) -> str | None:
    """The fastest candidate within the accuracy budget; ties go to the more accurate one.

    ``candidates``: ``(key, accuracy, drop, drop_se, speed)`` each, drop in points against the unreduced model.
    """
    eligible = [c for c in candidates if within_budget(c[2], c[3], max_drop, z)]
    if not eligible:
        return None
    return max(eligible, key=lambda c: (c[4], c[1]))[0]
