"""The search space of ``make tune``: which reducer schedules to try, read from the command line and checked.

Every axis is a finite list of values. A numeric flag is either a range ``LO:HI`` (every multiple of ``--step``
from LO to HI, both ends included) or a comma list (``0.5,0.7,1``); layer sets are ``auto`` or ``1,2;0,1``
(semicolons between sets). Values are checked by `ReducerSchedule`'s own rules, and a bad one is reported with
the flag that gave it. `SearchSpace.sample` draws a spread-out, seeded sample (a Latin hypercube over the value
lists), so a re-run with the same flags proposes the same schedules and finds them in the cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from dataclasses import dataclass

from pumer_lightning.reduce import IMPORTANCE_SOURCES, TEXT_MERGE_POLICIES, ReducerSchedule

#: Flag -> the `ReducerSchedule` field its values go to.
NUMERIC_FIELDS = {"--keep": "keep_ratio", "--merge": "merge_ratio", "--text-merge": "text_merge_ratio"}


class SpaceError(ValueError):
    """A search-space flag with a value `make tune` cannot use; the message names the flag."""


def schedule_key(schedule: ReducerSchedule | None) -> str:
    """A stable identity of a schedule for caches and reports: its fields as sorted JSON, ``off`` for none."""
    if schedule is None or not schedule.is_active:
        return "off"
    return json.dumps(dataclasses.asdict(schedule), sort_keys=True)


def schedule_label(schedule: ReducerSchedule | None) -> str:
    """``str(schedule)``, or ``off (unreduced)``."""
    return "off (unreduced)" if schedule is None or not schedule.is_active else str(schedule)


def _grid(flag: str, low: float, high: float, step: float) -> tuple[float, ...]:
    if step <= 0:
        raise SpaceError(f"--step must be > 0, got {step}")
    if high < low:
        raise SpaceError(f"{flag} {low}:{high}: the range must be LO:HI with LO <= HI")
    n = int(round((high - low) / step))
    values = [round(low + i * step, 6) for i in range(n + 1)]
    if values[-1] < high - 1e-9:
        values.append(round(high, 6))
    return tuple(v for v in values if v <= high + 1e-9)


def parse_numeric(flag: str, text: str, step: float) -> tuple[float, ...]:
    """``LO:HI`` or ``a,b,c`` -> the sorted values, each checked against the `ReducerSchedule` field."""
    field = NUMERIC_FIELDS[flag]
    try:
        if ":" in text:
            low, high = (float(part) for part in text.split(":"))
            values = _grid(flag, low, high, step)
        else:
            values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        if isinstance(err, SpaceError):
            raise
        raise SpaceError(f"{flag} {text!r}: expected LO:HI or a comma list of numbers") from None
    if not values:
        raise SpaceError(f"{flag} {text!r}: no values")
    for value in values:
        try:
            ReducerSchedule(layers=[0], **{field: value})
        except ValueError as err:
            raise SpaceError(f"{flag} {text}: {str(err).replace('ReducerSchedule.', '')}") from None
    return tuple(sorted(set(values)))


def parse_choices(flag: str, text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma list of names, each one of ``allowed``."""
    values = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SpaceError(f"{flag} {text!r}: expected a comma list of {', '.join(allowed)}")
    return values


def parse_layer_sets(text: str, depth: int, own: list[int], what: str) -> tuple[tuple[int, ...], ...]:
    """``auto`` (`auto_layer_sets`), ``1,2;0,1`` or JSON ``[[1,2],[0,1]]``, each set checked against ``depth``."""
    if text.strip() == "auto":
        return auto_layer_sets(own, depth)
    try:
        if text.strip().startswith("["):
            sets = [list(s) for s in json.loads(text)]
        else:
            sets = [
                [int(x) for x in part.split(",") if x.strip()] for part in text.split(";") if part.strip()
            ]
    except (ValueError, TypeError):
        raise SpaceError(
            f"--layers {text!r}: expected auto, sets like 1,2;0,1 or JSON like [[1,2],[0,1]]"
        ) from None
    out = []
    for layers in sets:
        if not layers:
            raise SpaceError(
                "--layers: an empty set (the unreduced model is always evaluated as the reference)"
            )
        try:
            ReducerSchedule(layers=layers, keep_ratio=0.5).check_depth(depth, what)
        except ValueError as err:
            raise SpaceError(
                f"--layers {layers}: {str(err).replace('ReducerSchedule.layers: ', '')}"
            ) from None
        out.append(tuple(sorted(set(layers))))
    return tuple(dict.fromkeys(out))


def auto_layer_sets(own: list[int], depth: int) -> tuple[tuple[int, ...], ...]:
    """The experiment's layers, shifted by one and two blocks either way, one fewer, and one more at the same
    spacing on either end; layers evenly spread over the depth when the experiment has none."""
    base = sorted(own) or sorted({max(0, min(depth - 1, round(depth * i / 4))) for i in (1, 2, 3)})
    gap = base[-1] - base[-2] if len(base) > 1 else 1
    sets = [base]
    for shift in (-1, 1, -2, 2):
        sets.append([layer + shift for layer in base])
    if len(base) > 1:
        sets.append(base[:-1])
    sets.append(base + [base[-1] + gap])
    sets.append([base[0] - gap] + base)
    valid = [tuple(s) for s in sets if s and all(0 <= layer < depth for layer in s)]
    return tuple(dict.fromkeys(valid))


@dataclass(frozen=True)
class SearchSpace:
    """The values each schedule field may take. ``base`` supplies the fields that are not searched
    (``prop_attn``, ``partition``), from the experiment's own schedule."""

    layer_sets: tuple[tuple[int, ...], ...]
    keep: tuple[float, ...]
    merge: tuple[float, ...]
    text_merge: tuple[float, ...]
    policies: tuple[str, ...] = ("real",)
    importance: tuple[str, ...] = ("text",)
    base: ReducerSchedule = dataclasses.field(default_factory=ReducerSchedule)

    @property
    def axes(self) -> tuple[tuple, ...]:
        return (self.layer_sets, self.keep, self.merge, self.text_merge, self.policies, self.importance)

    @property
    def size(self) -> int:
        """Value combinations (before combinations that mean the same schedule are merged)."""
        n = 1
        for axis in self.axes:
            n *= len(axis)
        return n

    def schedule(self, layers, keep, merge, text, policy, importance) -> ReducerSchedule | None:
        """One point of the space, with the choices that change nothing normalised away (no text merging: the
        policy is moot; nothing pruned: the importance is moot); None when it reduces nothing."""
        schedule = ReducerSchedule(
            layers=list(layers),
            keep_ratio=keep,
            merge_ratio=merge,
            text_merge_ratio=text,
            prop_attn=self.base.prop_attn,
            importance=importance if keep < 1.0 else "text",
            text_merge_policy=policy if text > 0 else "real",
            partition=self.base.partition,
        )
        return schedule if schedule.is_active else None

    def sample(self, n: int, seed: int = 0) -> list[ReducerSchedule]:
        """``n`` distinct schedules: a seeded Latin hypercube over the value lists (every axis's values are
        covered evenly), topped up with random points when combinations collapse; the whole space when it
        holds at most ``n`` distinct schedules."""
        rng = random.Random(seed)
        found: dict[str, ReducerSchedule] = {}
        if self.size <= 4 * n:
            every = [self.schedule(*combo) for combo in itertools.product(*self.axes)]
            distinct = {schedule_key(s): s for s in every if s is not None}
            if len(distinct) <= n:
                return list(distinct.values())
        strata = [rng.sample(range(n), n) for _ in self.axes]
        for i in range(n):
            combo = [
                axis[int((strata[a][i] + rng.random()) / n * len(axis))] for a, axis in enumerate(self.axes)
            ]
            self._add(found, combo)
        for _ in range(50 * n):
            if len(found) >= n:
                break
            self._add(found, [rng.choice(axis) for axis in self.axes])
        return list(found.values())[:n]

    def mutate(self, schedule: ReducerSchedule, rng: random.Random) -> ReducerSchedule | None:
        """A neighbour of ``schedule``: one or two of its fields moved one step along their value list (a
        numeric field to the next value up or down, the layer set, policy or importance to another choice)."""
        combo: list = [
            tuple(schedule.layers),
            schedule.keep_ratio,
            schedule.merge_ratio,
            schedule.text_merge_ratio,
            schedule.text_merge_policy,
            schedule.importance,
        ]
        for index in rng.sample(range(len(self.axes)), rng.choice((1, 2))):
            axis = self.axes[index]
            if len(axis) < 2:
                continue
            if index in (1, 2, 3):
                here = min(range(len(axis)), key=lambda i: abs(axis[i] - combo[index]))
                combo[index] = axis[min(len(axis) - 1, max(0, here + rng.choice((-1, 1))))]
            else:
                combo[index] = rng.choice([v for v in axis if v != combo[index]] or list(axis))
        return self.schedule(*combo)

    def _add(self, found: dict[str, ReducerSchedule], combo: list) -> None:
        schedule = self.schedule(*combo)
        if schedule is not None:
            found.setdefault(schedule_key(schedule), schedule)

    def describe(self) -> dict[str, object]:
        """The space as plain values, for reports."""
        return {
            "layers": [list(s) for s in self.layer_sets],
            "keep_ratio": list(self.keep),
            "merge_ratio": list(self.merge),
            "text_merge_ratio": list(self.text_merge),
            "text_merge_policy": list(self.policies),
            "importance": list(self.importance),
            "size": self.size,
        }


@dataclass
class SpaceFlags:
    """search space (LO:HI ranges at --step, or comma lists)"""

    layers: str = "auto"
    """layer sets: auto, 1,2;0,1 or [[1,2],[0,1]]"""
    keep: str = "0.5:1.0"
    """keep_ratio values"""
    merge: str = "0:0.5"
    """merge_ratio values"""
    text_merge: str = "0:0.3"
    """text_merge_ratio values"""
    text_merge_policy: str = "real,pads_first"
    """text_merge_policy values"""
    importance: str = "text,cls"
    """importance values"""
    step: float = 0.05
    """grid step of LO:HI ranges"""

    def __post_init__(self) -> None:
        if self.step <= 0:
            raise SpaceError(f"--step must be > 0, got {self.step}")


def build_space(flags: SpaceFlags, depth: int, own: ReducerSchedule | None, what: str) -> SearchSpace:
    """The `SearchSpace` of the command-line flags (see the module docstring) for a backbone of ``depth`` blocks
    (``what`` in errors); ``own`` is the experiment's schedule (layers for ``--layers auto``, ``prop_attn`` and
    ``partition``)."""
    base = own if own is not None else ReducerSchedule()
    return SearchSpace(
        layer_sets=parse_layer_sets(flags.layers, depth, list(base.layers), what),
        keep=parse_numeric("--keep", flags.keep, flags.step),
        merge=parse_numeric("--merge", flags.merge, flags.step),
        text_merge=parse_numeric("--text-merge", flags.text_merge, flags.step),
        policies=parse_choices("--text-merge-policy", flags.text_merge_policy, TEXT_MERGE_POLICIES),
        importance=parse_choices("--importance", flags.importance, IMPORTANCE_SOURCES),
        base=base,
    )
