"""The search over schedules of one trained model: propose, time, halve, finish, recommend, check.

`Tuner.run` does, in order (every figure through `TuneCache`, so a re-run measures only what it lacks):

1. **propose**: the unreduced model (the reference), the experiment's own schedule, and ``--candidates``
   schedules sampled from the `SearchSpace`;
2. **screen**: time every point (``--rounds`` interleaved rounds, in sessions of ``--timing-group`` points plus
   the reference) and count its FLOPs;
3. **halve**: successive halving on the search split (`rung_batches`, `survivors`): accuracy on a prefix of the
   split, the best ``1/eta`` by Pareto rank on (accuracy, speed) go on to a prefix ``eta`` times longer; the
   last rung is the whole split and its points are the finalists;
4. **finish**: time the finalists again with ``--final-rounds`` rounds in one session with the reference;
5. **evolve** (``--generations`` times): mutate the front's points nearest the accuracy budget
   (`SearchSpace.mutate`), and put ``--children`` new schedules through steps 2-4;
6. **recommend**: the ``--playoff`` fastest finalists whose drop against the reference is within ``--max-drop``
   points at ``--z`` standard errors (`within_budget`), timed again together with the experiment's schedule and
   the reference (``--playoff-rounds``); the fastest there;
7. **check** (``--check-split``, default the data's test split, never used to choose): the recommendation, the
   experiment's schedule and the reference scored on that split and timed together.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from pumer_lightning.lab.stats import paired_drop
from pumer_lightning.reduce import ReducerSchedule

from .cache import TuneCache
from .evaluate import REFERENCE, Evaluator
from .search import on_front, recommend, rung_batches, survivors, within_budget
from .space import SearchSpace, schedule_key, schedule_label


@dataclass
class Point:
    """One schedule and everything measured about it.

    ``accuracy``: rung (batches of the split) -> metric, SE, drop vs the reference and its SE, whether cached;
    ``timing``: stage (``screen``, ``final``, ``check``) -> examples/s, speed-up, spread, GFLOPs, cached;
    ``check``: the check split's accuracy figures.
    """

    schedule: ReducerSchedule | None
    role: str = "candidate"
    generation: int = 0
    accuracy: dict[int, dict[str, Any]] = field(default_factory=dict)
    timing: dict[str, dict[str, Any]] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return schedule_key(self.schedule)

    @property
    def label(self) -> str:
        return schedule_label(self.schedule)

    @property
    def top_rung(self) -> int:
        return max(self.accuracy) if self.accuracy else 0

    def at(self, rung: int | None = None) -> dict[str, Any]:
        """The accuracy figures at ``rung`` (default: the longest prefix it was scored on)."""
        return self.accuracy[self.top_rung if rung is None else rung]

    def speed(self, stage: str = "final") -> float:
        """Speed-up over the reference at ``stage``, falling back to the screening session."""
        figures = self.timing.get(stage) or self.timing.get("screen") or {}
        return float(figures.get("speedup", float("nan")))


@dataclass
class SearchFlags:
    """search"""

    candidates: int = 40
    """schedules sampled from the space"""
    eta: int = 2
    """halving factor: 1/eta of the schedules survive a rung"""
    min_finalists: int = 8
    """schedules scored on the whole split"""
    rounds: int = 3
    """interleaved rounds when screening"""
    final_rounds: int = 5
    """interleaved rounds for finalists and the check"""
    timing_group: int = 16
    """schedules per screening session"""
    generations: int = 1
    """rounds of mutating the front near the budget"""
    children: int = 12
    """new schedules per generation"""
    parents: int = 3
    """front points mutated per generation"""
    playoff: int = 4
    """fastest eligible finalists timed again together"""
    playoff_rounds: int = 10
    """interleaved rounds of the playoff and check"""
    max_drop: float = 1.0
    """accuracy budget in points vs unreduced"""
    z: float = 1.0
    """budget margin in standard errors: drop + z * SE <= max-drop (0: point estimate)"""
    seed: int = 0
    """sampling and evaluation seed"""

    def __post_init__(self) -> None:
        for name, low in SEARCH_LEAST.items():
            at_least(f"--{name.replace('_', '-')}", getattr(self, name), low)


# the least value of each search flag
SEARCH_LEAST = {
    "candidates": 0,
    "eta": 2,
    "min_finalists": 1,
    "rounds": 1,
    "final_rounds": 1,
    "timing_group": 1,
    "generations": 0,
    "children": 1,
    "parents": 1,
    "playoff": 1,
    "playoff_rounds": 1,
    "max_drop": 0,
    "z": 0,
}


def at_least(flag_name: str, value: float, low: float, strict: bool = False) -> None:
    """A flag's number below its least (or at it, ``strict``) stops the parse, the flag named."""
    if value < low or (strict and value == low):
        raise ValueError(f"{flag_name} must be {'>' if strict else '>='} {low}, got {value}")


@dataclass
class Settings(SearchFlags):
    """What the search was asked to do: the search flags and the splits they resolved to."""

    split: str = ""
    """the search split"""
    check_split: str | None = None
    """the split the recommendation is checked on (None: no check)"""


class Tuner:
    """Runs the search (module docstring) for one evaluator, cache and search space."""

    def __init__(
        self,
        evaluator: Evaluator,
        cache: TuneCache,
        space: SearchSpace,
        settings: Settings,
        context: dict[str, Any],
        own: ReducerSchedule | None,
    ) -> None:
        self.ev, self.cache, self.space, self.s = evaluator, cache, space, settings
        self.context, self.own = context, own
        self.points: list[Point] = []
        self.finalists: list[Point] = []
        self.contenders: list[str] = []
        self.rungs: list[dict[str, int]] = []
        self.stage_seconds: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ keys
    def accuracy_key(self, point: Point, split: str, n_batches: int) -> dict[str, Any]:
        return {
            "kind": "accuracy",
            **self.context,
            "schedule": point.key,
            "split": split,
            "batches": n_batches,
            "eval_batch_size": self.ev.dm.eval_batch_size,
        }

    def timing_key(self, point: Point, split: str, stage: str, rounds: int) -> dict[str, Any]:
        return {
            "kind": "timing",
            **self.context,
            **self.context_timing,
            "schedule": point.key,
            "split": split,
            "stage": stage,
            "rounds": rounds,
        }

    @property
    def context_timing(self) -> dict[str, Any]:
        return {"batch_size": self.ev.batch_size, "timing_batches": self.ev.timing_batches}

    # ------------------------------------------------------------------------------------------ stages
    def propose(self) -> list[Point]:
        """The reference, the experiment's schedule and the sampled candidates, without duplicates."""
        points = {REFERENCE: Point(None, "reference")}
        if self.own is not None and self.own.is_active:
            points.setdefault(schedule_key(self.own), Point(self.own, "experiment"))
        for schedule in self.space.sample(self.s.candidates, self.s.seed):
            points.setdefault(schedule_key(schedule), Point(schedule))
        self.points = list(points.values())
        return self.points

    def score(self, points: list[Point], split: str, n_batches: int, desc: str) -> None:
        """Accuracy of ``points`` on the first ``n_batches`` of ``split``, from the cache or measured; the drop is
        paired with the reference measured in the same run (so the reference is re-scored when anything is)."""
        todo = []
        for point in points:
            if self._has(point, split, n_batches):
                continue
            cached = self.cache.get(self.accuracy_key(point, split, n_batches))
            if cached is not None:
                self._store(point, split, n_batches, {**cached, "cached": True})
            else:
                todo.append(point)
        if not todo:
            return
        reference = self.ev.accuracy(None, split, n_batches)
        for point in tqdm(todo, desc=desc, unit="schedule"):
            result = (
                reference if point.key == REFERENCE else self.ev.accuracy(point.schedule, split, n_batches)
            )
            drop, drop_se = paired_drop(reference, result)
            figures = {k: v for k, v in result.items() if k != "scores"}
            figures.update(drop=drop, drop_se=drop_se)
            self.cache.put(self.accuracy_key(point, split, n_batches), figures)
            self._store(point, split, n_batches, {**figures, "cached": False})

    def _has(self, point: Point, split: str, n_batches: int) -> bool:
        if split == self.s.split:
            return n_batches in point.accuracy
        return point.check.get("split") == split

    def _store(self, point: Point, split: str, n_batches: int, figures: dict[str, Any]) -> None:
        if split == self.s.split:
            point.accuracy[n_batches] = figures
        else:
            point.check = {**figures, "split": split}

    def time(
        self, points: list[Point], split: str, stage: str, rounds: int, group: int, together: bool = False
    ) -> None:
        """Timing of ``points`` at ``stage`` from the cache, or measured in sessions of at most ``group`` missing
        points plus the reference and the experiment's schedule, whose figures come from the first session (so
        that a point compares with them within one session); ``together``: re-time all ``points`` in one
        session when any is missing."""
        todo = set()
        for point in points:
            if stage in point.timing and not together:
                continue
            cached = self.cache.get(self.timing_key(point, split, stage, rounds))
            if cached is not None:
                point.timing[stage] = {**cached, "cached": True}
            else:
                todo.add(point.key)
        if not todo:
            return
        if together:
            todo = {p.key for p in points}
        fixed = [p for p in self.points if p.role != "candidate"]
        missing = [p for p in points if p.key in todo and p.role == "candidate"]
        chunks = [missing[i : i + group] for i in range(0, len(missing), group)] or [[]]
        done: set[str] = set()
        for index, chunk in enumerate(chunks):
            members = {p.key: p for p in [*fixed, *chunk]}
            desc = f"{stage} timing {index + 1}/{len(chunks)} ({len(members)} settings x {rounds} rounds)"
            figures = self.ev.timing({k: p.schedule for k, p in members.items()}, split, rounds, desc)
            for key, point in members.items():
                if key in todo and key not in done:
                    self.cache.put(self.timing_key(point, split, stage, rounds), figures[key])
                    point.timing[stage] = {**figures[key], "cached": False}
                    done.add(key)

    def halve(self, points: list[Point], generation: int = 0) -> list[Point]:
        """Successive halving over ``points`` (timed first when there is more than one rung); returns the
        finalists, scored on the whole split."""
        split = self.s.split
        total = self.ev.split_batches(split)
        rungs = rung_batches(total, len(points), self.s.eta, self.s.min_finalists)
        if len(rungs) > 1:
            self._timed("screen", points, self.s.rounds, self.s.timing_group)
        alive = list(points)
        for index, n_batches in enumerate(rungs):
            clock = time.perf_counter()
            examples = self.ev.split_examples(split, n_batches)
            desc = f"generation {generation} rung {index + 1}/{len(rungs)}: {len(alive)} schedules, {examples} examples"
            self.score(alive, split, n_batches, desc)
            self._clock("accuracy", clock)
            self.rungs.append(
                {
                    "generation": generation,
                    "batches": n_batches,
                    "examples": examples,
                    "points": len(alive),
                    "cached": sum(bool(p.at(n_batches).get("cached")) for p in alive),
                }
            )
            if index == len(rungs) - 1:
                break
            values = [(p.at(n_batches)["value"], p.speed("screen")) for p in alive]
            keep = [i for i, p in enumerate(alive) if p.role != "candidate"]
            alive = [alive[i] for i in survivors(values, math.ceil(len(alive) / self.s.eta), keep)]
        self._timed("final", alive, self.s.final_rounds, len(alive))
        return alive

    def _timed(
        self, stage: str, points: list[Point], rounds: int, group: int, together: bool = False
    ) -> None:
        clock = time.perf_counter()
        self.time(points, self.s.split, stage, rounds, group, together)
        self._clock(f"{stage} timing", clock)

    def _clock(self, stage: str, since: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - since

    @property
    def full(self) -> int:
        """Batches of the whole search split (the last rung)."""
        return self.ev.split_batches(self.s.split)

    def objectives(self, points: list[Point]) -> list[tuple[float, float]]:
        """(accuracy on the whole split, final speed-up) of finalists."""
        return [(p.at(self.full)["value"], p.speed("final")) for p in points]

    def offspring(self, generation: int) -> list[Point]:
        """``--children`` new schedules, mutations of the parents (`parents`), none evaluated before."""
        parents = [p for p in self.parents() if p.schedule is not None]
        if not parents:
            return []
        rng = random.Random(self.s.seed * 1009 + generation)
        known = {p.key for p in self.points}
        children: dict[str, Point] = {}
        for attempt in range(50 * self.s.children):
            if len(children) >= self.s.children:
                break
            child = self.space.mutate(parents[attempt % len(parents)].schedule, rng)
            if child is not None and schedule_key(child) not in known:
                children.setdefault(schedule_key(child), Point(child, generation=generation))
        return list(children.values())

    def parents(self) -> list[Point]:
        """The current recommendation, then the front's other points whose drop is nearest the budget (where a
        slightly different schedule could change the recommendation), then the fastest other finalists."""
        front = [p for p, f in zip(self.finalists, on_front(self.objectives(self.finalists))) if f]
        near = sorted(front, key=lambda p: abs(p.at(self.full)["drop"] - self.s.max_drop))
        fastest = sorted(self.finalists, key=lambda p: -p.speed("final"))
        ordered = {
            p.key: p for p in [self.recommend(self.finalists), *near, *fastest] if p.schedule is not None
        }
        return list(ordered.values())[: self.s.parents]

    def row(self, point: Point) -> tuple[str, float, float, float, float]:
        """``(key, accuracy, drop, drop_se, final speed-up)`` on the whole search split, as `recommend` takes it."""
        top = point.at(self.full)
        return point.key, top["value"], top["drop"], top["drop_se"], point.speed("final")

    def recommend(self, finalists: list[Point]) -> Point:
        """The fastest finalist (final timing) within the accuracy budget; the reference when none is faster."""
        key = recommend([self.row(p) for p in finalists], self.s.max_drop, self.s.z)
        return next(p for p in finalists if p.key == (key or REFERENCE))

    def playoff(self) -> tuple[Point, list[Point]]:
        """The ``--playoff`` fastest finalists within the budget, timed again in one session with the
        experiment's schedule and the reference (``--playoff-rounds``): the fastest of them there is the
        recommendation (speed-ups of a few tenths are within one session's noise on a shared machine)."""
        budget = self.s.max_drop, self.s.z
        eligible = [p for p in self.finalists if within_budget(*self.row(p)[2:4], *budget)]
        eligible.sort(key=lambda p: (-p.speed("final"), -p.at(self.full)["value"]))
        contenders = eligible[: self.s.playoff]
        fixed = [p for p in self.points if p.role != "candidate"]
        members = list({p.key: p for p in [*fixed, *contenders]}.values())
        self._timed("playoff", members, self.s.playoff_rounds, len(members), together=True)
        chosen = max(contenders, key=lambda p: (p.speed("playoff"), p.at(self.full)["value"]))
        self.contenders = [p.key for p in contenders]
        return chosen, members

    def check(self, chosen: Point) -> list[Point]:
        """The recommendation, the experiment's schedule and the reference on ``check_split``: accuracy on the
        whole split (drop paired with the reference) and timing in one session."""
        split = self.s.check_split
        assert split is not None
        members = {p.key: p for p in self.points if p.role != "candidate"}
        members.setdefault(chosen.key, chosen)
        points = list(members.values())
        self.score(points, split, self.ev.split_batches(split), f"check on {split}")
        self.time(points, split, "check", self.s.playoff_rounds, len(points), together=True)
        return points

    # ------------------------------------------------------------------------------------------ driver
    def run(self) -> dict[str, Any]:
        """All stages; returns the finalists, which of them are on the front, the recommendation and the check."""
        self.propose()
        self.finalists = self.halve(self.points)
        for generation in range(1, self.s.generations + 1):
            children = self.offspring(generation)
            if not children:
                break
            self.points += children
            self.finalists += self.halve(children, generation)
        front = on_front(self.objectives(self.finalists))
        chosen, playoff = self.playoff()
        checked: list[Point] = []
        if self.s.check_split:
            clock = time.perf_counter()
            checked = self.check(chosen)
            self._clock("check", clock)
        return {
            "finalists": self.finalists,
            "front": front,
            "chosen": chosen,
            "playoff": playoff,
            "checked": checked,
        }
