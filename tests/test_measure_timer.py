"""`pumer_lightning.measure.interleaved_times`: the one interleaved timer (no time value is asserted)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pumer_lightning.measure import (
    count_flops,
    interleaved_times,
    median_rates,
    paired_speedups,
    rotated_order,
    speedup,
    spread,
)


def _recorder(names):
    calls: list[str] = []
    return calls, {name: (lambda name=name: calls.append(name)) for name in names}


def test_two_settings_alternate_and_are_each_timed_rounds_times():
    calls, runs = _recorder(["reduced", "unreduced"])
    times = interleaved_times(runs, rounds=4, warmup=1, desc=None)
    assert calls[:2] == ["reduced", "unreduced"]  # warm-up
    rounds = [calls[i : i + 2] for i in range(2, len(calls), 2)]
    assert rounds == [
        ["reduced", "unreduced"],
        ["unreduced", "reduced"],
        ["reduced", "unreduced"],
        ["unreduced", "reduced"],
    ]
    assert set(times) == {"reduced", "unreduced"}
    assert all(len(v) == 4 and all(t >= 0 for t in v) for v in times.values())


def test_n_settings_rotate_so_each_goes_first_equally_often():
    names = ["a", "b", "c"]
    calls, runs = _recorder(names)
    times = interleaved_times(runs, rounds=6, warmup=0, desc=None)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert rounds == [rotated_order(names, r) for r in range(6)]
    assert [r[0] for r in rounds].count("a") == [r[0] for r in rounds].count("c") == 2
    assert all(sorted(r) == names for r in rounds)
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6, "c": 6}


def test_inner_calls_per_sample_and_sync_around_every_sample():
    calls, runs = _recorder(["x", "y"])
    synced: list[int] = []
    interleaved_times(
        runs, rounds=2, warmup=0, inner={"x": 3, "y": 1}, sync=lambda: synced.append(1), desc=None
    )
    assert calls.count("x") == 6 and calls.count("y") == 2
    assert len(synced) == 2 * 2 * 2  # before and after each of 4 samples


def test_on_round_sees_the_samples_so_far():
    _, runs = _recorder(["x", "y"])
    seen = []
    interleaved_times(
        runs, rounds=3, warmup=0, desc=None, on_round=lambda r, t: seen.append((r, len(t["x"])))
    )
    assert seen == [(0, 1), (1, 2), (2, 3)]


def test_context_wraps_every_call_and_restores_on_error():
    state = {"setting": "own"}
    entered: list[str] = []

    @contextlib.contextmanager
    def using(name):
        previous, state["setting"] = state["setting"], name
        entered.append(name)
        try:
            yield
        finally:
            state["setting"] = previous

    seen: list[tuple[str, str]] = []
    count = {"n": 0}

    def run(name):
        def call():
            seen.append((name, state["setting"]))
            count["n"] += 1
            if count["n"] == 5:
                raise RuntimeError("boom")

        return call

    with pytest.raises(RuntimeError, match="boom"):
        interleaved_times({"a": run("a"), "b": run("b")}, rounds=5, warmup=1, context=using, desc=None)
    assert all(name == setting for name, setting in seen)  # every call ran under its own setting
    assert state["setting"] == "own"  # restored after the error
    assert len(entered) == 5


def test_backbone_using_restores_the_schedule_on_error():
    from pumer_lightning.models import build_backbone
    from pumer_lightning.reduce import ReducerSchedule

    backbone = build_backbone("vilt_tiny")
    own = ReducerSchedule(layers=[1], keep_ratio=0.5)
    backbone.reducer = own
    seen = []

    def forward():
        seen.append(backbone.reducer)
        if len(seen) == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        interleaved_times(
            {"reduced": forward, "unreduced": forward},
            rounds=2,
            warmup=0,
            context=lambda name: backbone.using(own if name == "reduced" else None),
            desc=None,
        )
    assert seen == [own, None, None]
    assert backbone.reducer is own


def test_bad_arguments():
    with pytest.raises(ValueError):
        interleaved_times({"a": lambda: None}, rounds=-1)
    with pytest.raises(ValueError):
        interleaved_times({"a": lambda: None}, rounds=1, inner=0)


def test_summaries_are_ratios_of_medians():
    times = {"unreduced": [2.0, 4.0, 3.0], "reduced": [1.0, 1.5, 9.0]}
    assert median_rates(times, 6) == {"unreduced": 2.0, "reduced": 4.0}
    assert speedup(times, "unreduced", "reduced") == 2.0
    assert spread(times["unreduced"]) == 2.0


def test_paired_speedups_are_per_round_ratios():
    times = {"unreduced": [2.0, 4.0, 3.0], "reduced": [1.0, 1.0, 6.0]}
    assert paired_speedups(times, "unreduced", "reduced") == [2.0, 4.0, 0.5]
    assert paired_speedups(times, "unreduced", "unreduced") == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="not paired by round"):
        paired_speedups({"a": [1.0, 2.0], "b": [1.0]}, "a", "b")


def test_count_flops_counts_a_matmul():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    assert count_flops(lambda: a @ b) == 2 * 4 * 8 * 3
