"""The search's parts on plain numbers: rung sizes, Pareto ranks, survivors, the recommendation rule, the search
space (parsing, sampling, mutation) and the standard errors."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.tune import SpaceError, build_space, pareto_ranks, recommend, rung_batches, survivors
from pumer_lightning.tune.cache import TuneCache, code_fingerprint
from pumer_lightning.tune.search import crowding
from pumer_lightning.tune.space import (
    SpaceFlags,
    auto_layer_sets,
    parse_layer_sets,
    parse_numeric,
    schedule_key,
)


def space(**flags):
    """The search space of ``make tune``'s default flags (``flags`` changed) for ``vilt_tiny``."""
    own = ReducerSchedule(layers=[1, 2], keep_ratio=0.7)
    return build_space(SpaceFlags(**flags), 4, own, "vilt_tiny backbone")


def test_rungs_halve_down_to_the_finalists_and_end_on_the_whole_split():
    assert rung_batches(3, 42, 2, 8) == [1, 2, 3]  # the demo: 200, 400, 600 examples
    assert rung_batches(5, 7, 2, 2) == [3, 5]
    assert rung_batches(100, 40, 3, 4) == [12, 34, 100]
    assert rung_batches(1, 40, 2, 8) == [1]
    assert rung_batches(8, 4, 2, 8) == [8]
    with pytest.raises(ValueError, match="--eta must be >= 2"):
        rung_batches(8, 40, 1, 8)


def test_pareto_ranks_survivors_and_crowding():
    values = [(0.9, 1.0), (0.8, 1.5), (0.7, 2.0), (0.6, 1.2), (0.85, 0.9), (0.5, 0.5)]
    assert pareto_ranks(values) == [0, 0, 0, 1, 1, 2]
    distance = crowding(values, [0, 1, 2])
    assert distance[0] == distance[2] == math.inf and 0 < distance[1] < math.inf
    assert sorted(survivors(values, 3)) == [0, 1, 2]
    # forced points survive and count; the rest come by rank
    assert sorted(survivors(values, 3, keep=[5])) == [0, 2, 5]
    assert len(survivors(values, 10)) == len(values)


def test_recommend_takes_the_fastest_point_within_the_budget():
    rows = [
        ("off", 0.70, 0.0, 0.0, 1.0),
        ("a", 0.695, 0.5, 0.3, 1.3),
        ("b", 0.68, 2.0, 0.5, 1.8),
        ("c", 0.69, 0.9, 0.4, 1.3),
    ]
    assert recommend(rows, 1.0, 0.0) == "a"  # a and c tie on speed: the more accurate wins
    assert recommend(rows, 2.0, 0.0) == "b"
    assert recommend(rows, 1.0, 1.0) == "a"  # 0.9 + 0.4 > 1: c is out at one SE anyway
    assert recommend(rows, 0.6, 1.0) == "off"
    assert recommend([("x", 0.5, 3.0, 0.1, 2.0)], 1.0, 0.0) is None


def test_the_space_parses_ranges_lists_and_layer_sets_with_the_flag_in_errors():
    assert parse_numeric("--keep", "0.5:1.0", 0.1) == (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert parse_numeric("--merge", "0.3,0,0.1", 0.05) == (0.0, 0.1, 0.3)
    assert parse_layer_sets("1,2;0", 4, [], "x") == ((1, 2), (0,))
    assert parse_layer_sets("[[2, 1], [3]]", 4, [], "x") == ((1, 2), (3,))
    assert auto_layer_sets([1, 2], 4) == ((1, 2), (0, 1), (2, 3), (1,), (1, 2, 3), (0, 1, 2))
    assert auto_layer_sets([2, 5, 8], 12)[:3] == ((2, 5, 8), (1, 4, 7), (3, 6, 9))
    assert (2, 5, 8, 11) in auto_layer_sets([2, 5, 8], 12)
    assert auto_layer_sets([], 4) == ((1, 2, 3), (0, 1, 2), (1, 2), (0, 1, 2, 3))
    for kwargs, message in [
        ({"keep": "0:1"}, r"--keep 0:1: keep_ratio must be in \(0, 1\], got 0.0"),
        ({"text_merge": "a:b"}, r"--text-merge 'a:b': expected LO:HI or a comma list"),
        ({"layers": "1,2;"}, None),
        ({"layers": "0,4"}, r"--layers \[0, 4\]: block index \[4\] out of range for vilt_tiny backbone"),
        (
            {"importance": "text,attention"},
            r"--importance 'text,attention': expected a comma list of text, cls",
        ),
        ({"step": 0.0}, r"--step must be > 0"),
    ]:
        if message is None:
            assert space(**kwargs).layer_sets == ((1, 2),)
            continue
        with pytest.raises(SpaceError, match=message):
            space(**kwargs)


def test_sampling_is_seeded_distinct_and_normalised():
    s = space()
    first, again, other = s.sample(40, seed=0), s.sample(40, seed=0), s.sample(40, seed=1)
    keys = [schedule_key(x) for x in first]
    assert keys == [schedule_key(x) for x in again] and keys != [schedule_key(x) for x in other]
    assert len(set(keys)) == 40
    for schedule in first:
        assert tuple(schedule.layers) in s.layer_sets and schedule.is_active
        assert schedule.keep_ratio in s.keep and schedule.merge_ratio in s.merge
        assert schedule.text_merge_ratio > 0 or schedule.text_merge_policy == "real"
        assert schedule.keep_ratio < 1 or schedule.importance == "text"
    # every keep value is covered by 40 points spread as a Latin hypercube
    assert {x.keep_ratio for x in first} == set(s.keep)
    # a space with fewer distinct schedules than asked for is enumerated whole
    small = space(layers="1", keep="0.7", merge="0,0.2", text_merge="0", importance="text")
    assert len(small.sample(40)) == 2


def test_mutation_moves_one_or_two_fields_one_step_within_the_space():
    s = space()
    parent = ReducerSchedule(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.2, text_merge_ratio=0.2)
    rng = random.Random(0)
    for _ in range(50):
        child = s.mutate(parent, rng)
        if child is None:
            continue
        assert tuple(child.layers) in s.layer_sets
        assert abs(child.keep_ratio - 0.7) <= 0.05 + 1e-9 and abs(child.merge_ratio - 0.2) <= 0.05 + 1e-9
        assert abs(child.text_merge_ratio - 0.2) <= 0.05 + 1e-9


def test_the_cache_keeps_every_figure_by_key_and_survives_a_cut_line(tmp_path):
    path = tmp_path / "tune" / "cache.jsonl"
    cache = TuneCache(path)
    key = {"kind": "accuracy", "schedule": "off", "split": "val", "batches": 3}
    figures = {"value": 0.5, "se": 0.1, "n": 24, "drop": 0.0, "drop_se": 0.0}
    assert cache.get(key) is None and cache.misses["accuracy"] == 1
    cache.put(key, figures)
    cache.put({**key, "batches": 1}, {**figures, "value": 0.4})
    with path.open("a") as f:
        f.write('{"id": "cut sh')  # an interrupted write
    again = TuneCache(path)
    assert again.get(key) == figures and again.get({**key, "batches": 1})["value"] == 0.4
    assert again.hits["accuracy"] == 2 and again.get({**key, "split": "test"}) is None
    assert again.skipped == 0  # a cut last line is an interrupted write, not a bad line
    # the next figure starts on a line of its own: the cut line does not swallow it
    again.put({**key, "split": "test"}, {**figures, "value": 0.3})
    assert TuneCache(path).get({**key, "split": "test"})["value"] == 0.3
    assert TuneCache(path, fresh=True).get(key) is None
    assert len(code_fingerprint()) == 16


def test_nothing_in_the_package_imports_tune():
    """Only the command line's dispatch map (above every driver) names the tuner."""
    root = Path(__file__).resolve().parents[2] / "pumer_lightning"
    importers = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "tune" not in path.relative_to(root).parts[:1]
        and path != root / "__main__.py"
        and re.search(r"(pumer_lightning\.tune\b|from \.+tune\b|import tune\b)", path.read_text())
    ]
    assert importers == []
