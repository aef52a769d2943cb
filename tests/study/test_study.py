"""The accuracy study: its statistics, and one end-to-end run on a tiny budget (real data, real trainers)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pumer_lightning import study
from pumer_lightning.study import Budget, StudyConfig, accuracy, chance, paired, run_study


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


def test_chance_is_the_best_constant_answer_per_type():
    nlvr2 = [{"labels": torch.tensor([1, 0, 1, 1]), "meta": [{"statement_type": t} for t in "aabb"]}]
    assert chance(nlvr2, num_classes=2) == {"a": 0.5, "b": 1.0}
    vqa = [{"labels": torch.tensor([[1.0, 0.0], [0.6, 0.3], [0.0, 1.0]]),
            "meta": [{"statement_type": "x"}] * 3}]  # fmt: skip
    assert chance(vqa, num_classes=2)["x"] == pytest.approx(1.6 / 3)


def test_budgets_fit_their_promises():
    """The default budget is what `make study` runs; its stages must keep their order of magnitude."""
    default = study.BUDGETS["default"]
    assert default.finetune_steps < default.baseline_steps
    assert default.num_test >= 3 * 300  # at least 300 examples per statement type


def test_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch):
    monkeypatch.setitem(
        study.BUDGETS, "tiny", Budget(pretrain_steps=3, baseline_steps=3, finetune_steps=2, num_train=96,
                                      num_val=48, num_test=48),
    )  # fmt: skip
    cfg = StudyConfig(budget="tiny", preset="vilt_tiny", batch_size=16, keep_sweep=(0.5, 0.7))
    out = tmp_path / "out"
    result = run_study(cfg, tmp_path / "work", out, workers=0, timing_rounds=1)
    stored = json.loads((out / "shapes_tiny.json").read_text())
    assert stored["settings"] == json.loads(json.dumps(result["settings"]))
    assert (out / "shapes_tiny.md").read_text().startswith("# PuMer accuracy study")
    assert (out / "shapes_tiny.png").stat().st_size > 0
    names = [s["name"] for s in result["settings"]]
    for required in ("baseline", "pumer", "random_prune", "cls_prune", "keep_0.5", "random_keep_0.5",
                     "ft_pumer", "ft_control", "ft_pumer_distil"):  # fmt: skip
        assert required in names
    by = {s["name"]: s for s in result["settings"]}
    assert by["baseline"]["flops_ratio"] == 1.0
    assert by["pumer"]["flops_ratio"] > 1.0 and by["keep_0.5"]["flops_ratio"] > by["pumer"]["flops_ratio"]
    # the same budget costs the same FLOPs whichever tokens are chosen, and fine-tuned weights cost the same
    assert by["random_prune"]["gflops_per_example"] == pytest.approx(
        by["pumer"]["gflops_per_example"], rel=0.02
    )
    assert by["ft_pumer"]["gflops_per_example"] == by["pumer"]["gflops_per_example"]
    assert by["ft_control"]["gflops_per_example"] == by["baseline"]["gflops_per_example"]
    assert by["pumer"]["image_tokens_per_layer"][0] > by["pumer"]["image_tokens_per_layer"][-1]
    for s in result["settings"]:
        assert s["all"]["n"] == 48 and 0.0 <= s["all"]["acc"] <= 1.0
        assert set(s["by_type"]) == {"shape", "color", "exist"}
    assert {"pumer_ft_minus_control_ft", "random_keep0.5_minus_pumer_keep0.5"} <= set(result["comparisons"])
    assert all(st["chance"] == 0.5 for st in result["validation"]["by_type"].values())
    # a second run finds every stage in the cache and trains nothing
    again = run_study(cfg, tmp_path / "work", out, workers=0, timing_rounds=1)
    assert again["train_seconds"] == {}


def test_vqa_variant_scores_with_soft_labels(tmp_path, monkeypatch):
    """``--task vqa2``: the VQA model trained from scratch is the baseline; scores are VQA scores and chance is the
    best constant answer of each question type (not 0.5)."""
    monkeypatch.setitem(
        study.BUDGETS, "tiny", Budget(pretrain_steps=2, baseline_steps=2, finetune_steps=1, num_train=60,
                                      num_val=30, num_test=30),
    )  # fmt: skip
    cfg = StudyConfig(budget="tiny", task="vqa2", preset="vilt_tiny", batch_size=16, keep_sweep=(0.5,))
    result = run_study(cfg, tmp_path / "work", tmp_path / "out", workers=0, timing_rounds=1)
    assert (tmp_path / "out" / "shapes_vqa2_tiny.json").exists()
    assert result["metric"] == "VQA score" and result["pretrain_vqa_val_score"] is not None
    chances = [s["chance"] for s in result["validation"]["by_type"].values()]
    assert all(0.0 < c < 1.0 for c in chances) and any(c != 0.5 for c in chances)
    assert "pretrain" in result["train_seconds"] and "baseline" not in result["train_seconds"]


def test_a_stage_trains_to_the_same_weights_whatever_ran_before(tmp_path, monkeypatch):
    """Seeded before the model is built: the same stage twice in one process gives identical weights, although
    the global generator was used in between (the first study runs initialised their models unseeded)."""
    monkeypatch.setitem(
        study.BUDGETS, "tiny", Budget(pretrain_steps=2, baseline_steps=2, finetune_steps=1, num_train=60,
                                      num_val=30, num_test=30),
    )  # fmt: skip
    st = study.Study(StudyConfig(budget="tiny", preset="vilt_tiny", batch_size=16), tmp_path, False,
                     "cpu", 0)  # fmt: skip
    st.data()
    first = st.train("pretrain", "vqa2", None, None, 2, 1e-3, path=tmp_path / "a.ckpt")
    torch.rand(1000)  # disturb the global generator
    second = st.train("pretrain", "vqa2", None, None, 2, 1e-3, path=tmp_path / "b.ckpt")
    a = torch.load(first, weights_only=False)["state_dict"]
    b = torch.load(second, weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
