"""`pumer_lightning.lab.stats`: accuracy, paired differences and standard errors, over test examples and over
training seeds."""

from __future__ import annotations

import math
import statistics

import pytest

from pumer_lightning.lab.stats import (
    accuracy,
    mean_se,
    over_seeds,
    paired,
    paired_drop,
    paired_over_seeds,
    seed_se,
    summarize,
)


def test_accuracy_reports_mean_and_standard_error_per_type():
    scores = [1, 0, 1, 1, 0.5, 0.0]
    types = ["shape", "shape", "color", "color", "exist", "exist"]
    out = accuracy(scores, types, only=("shape", "color"))
    assert out["all"]["acc"] == pytest.approx(3.5 / 6) and out["all"]["n"] == 6
    assert out["by_type"]["shape"] == {"acc": 0.5, "se": pytest.approx(math.sqrt(0.5 / 2)), "n": 2}
    assert out["by_type"]["color"]["se"] == 0.0
    assert out["learned"]["acc"] == pytest.approx(0.75) and out["learned"]["n"] == 4


def test_paired_difference_uses_the_same_examples():
    a = [1, 1, 0, 1, 1, 0]
    b = [1, 0, 0, 1, 0, 1]
    types = ["shape"] * 4 + ["rel"] * 2  # rel is left out
    d = paired(a, b, types, only=("shape",))
    assert d["n"] == 4 and d["diff"] == pytest.approx(0.25)
    # differences 0, 1, 0, 0: sample sd 0.5, se 0.25
    assert d["se"] == pytest.approx(0.25)


def test_over_seeds_combines_seed_spread_and_sampling_error():
    types = ["shape"] * 4
    per_seed = [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]  # accuracies 0.5, 0.75, 1.0
    out = over_seeds(per_seed, types, only=("shape",))
    stat = out["learned"]
    assert stat["acc"] == pytest.approx(0.75) and stat["per_seed"] == [0.5, 0.75, 1.0]
    assert stat["se_seeds"] == pytest.approx(0.25 / math.sqrt(3))  # sd 0.25 over 3 seeds
    means = [1, 1, 2 / 3, 1 / 3]  # the seed-averaged per-example scores
    m = sum(means) / 4
    se_sample = math.sqrt(sum((x - m) ** 2 for x in means) / 3 / 4)
    assert stat["se_sample"] == pytest.approx(se_sample)
    assert stat["se"] == pytest.approx(math.hypot(se_sample, 0.25 / math.sqrt(3)))
    # one seed: exactly `accuracy`
    single = over_seeds([[1, 0, 1, 1]], types, only=("shape",))["learned"]
    assert single["se"] == accuracy([1, 0, 1, 1], types, only=("shape",))["learned"]["se"]


def test_paired_over_seeds_matches_seeds_and_includes_their_spread():
    types = ["shape"] * 4
    a = [[1, 1, 0, 0], [1, 1, 1, 1]]
    b = [[1, 0, 0, 0], [1, 1, 1, 1]]  # per-seed differences 0.25, 0.0
    d = paired_over_seeds(a, b, types, only=("shape",))
    assert d["diff"] == pytest.approx(0.125) and d["per_seed"] == [0.25, 0.0] and d["seeds"] == 2
    assert d["se_seeds"] == pytest.approx(math.sqrt(0.125**2 * 2) / math.sqrt(2))
    assert d["se_sample"] == pytest.approx(
        paired([1, 1, 0.5, 0.5], [1, 0.5, 0.5, 0.5], types, ("shape",))["se"]
    )
    assert d["se"] == pytest.approx(math.hypot(d["se_seeds"], d["se_sample"]))
    # a single model on one side (training-free) is compared with every seed of the other
    one = paired_over_seeds(a, [[1, 0, 0, 0]], types, only=("shape",))
    assert one["per_seed"] == [0.25, 0.75]
    # one seed each: exactly `paired`
    assert (
        paired_over_seeds(a[:1], b[:1], types, ("shape",))["se"]
        == paired(a[0], b[0], types, ("shape",))["se"]
    )


def test_summarize_uses_per_example_scores_when_they_reproduce_the_metric():
    right = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    value = sum(right) / len(right)
    per_example = summarize(value, right, 8)
    assert per_example["se_kind"] == "per-example" and per_example["n"] == 8
    assert per_example["se"] == pytest.approx(statistics.stdev(right) / math.sqrt(8))
    # scores that do not reproduce the logged value: binomial over the examples, no scores kept
    other = summarize(0.5, right, 8)
    assert (
        other["se_kind"] == "binomial"
        and other["scores"] == []
        and other["se"] == pytest.approx(math.sqrt(0.25 / 8))
    )
    binomial = summarize(0.8, [], 100)  # no per-example scores: sqrt(p (1 - p) / n)
    assert binomial["se_kind"] == "binomial" and binomial["se"] == pytest.approx(0.04)
    # a paired drop: the same examples, differences averaged
    reference = summarize(0.75, [1.0, 1.0, 0.0, 1.0], 4)
    drop, se = paired_drop(reference, summarize(0.5, [1.0, 0.0, 0.0, 1.0], 4))
    assert drop == pytest.approx(25.0) and se == pytest.approx(25.0)
    # without per-example scores on one side: the two standard errors combined
    drop, se = paired_drop(reference, {"value": 0.5, "se": 0.1})
    assert drop == pytest.approx(25.0) and se == pytest.approx(100 * math.hypot(reference["se"], 0.1))


def test_mean_se_and_seed_se_edge_cases():
    empty = mean_se([])
    assert empty["n"] == 0 and math.isnan(empty["acc"]) and math.isnan(empty["se"])
    assert mean_se([0.7]) == {"acc": 0.7, "se": 0.0, "n": 1}
    assert seed_se([0.5]) == 0.0 and seed_se([0.5, 0.7]) == pytest.approx(
        statistics.stdev([0.5, 0.7]) / math.sqrt(2)
    )
