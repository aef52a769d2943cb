"""The accuracy study: its cache keys, settings and stages, and end-to-end runs on a tiny budget (real data, real
trainers). Its statistics are `pumer_lightning.lab.stats` (tests/lab/test_stats.py)."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from pumer_lightning import study
from pumer_lightning.reduce import ABLATIONS, ReducerSchedule, ablation
from pumer_lightning.study import Budget, Stage, StudyConfig, run_study
from pumer_lightning.study.evaluate import chance
from pumer_lightning.study.settings import free_settings
from pumer_lightning.study.train import adaptation_world, finetune_schedules, finetunes


def test_fine_tune_seeds_and_padding_leave_the_shared_stages_cache_keys_alone(tmp_path):
    """Pre-training and baseline are cached under the keys earlier versions used; new fine-tune options (seed,
    fixed padding) only enter the keys of the stages that use them."""
    st = study.Study(StudyConfig(), tmp_path, False, "cpu", 0)
    c = st.cfg
    legacy = study.cache_key(
        "baseline", "pre.pt", "None", "None", None, 3000, c.baseline_lr, c.seed, c.batch_size
    )
    key = {}

    def fake_fit(label, model, dm, steps, seed=None):  # record the path instead of training
        raise AssertionError("cached stages must not train")

    st.fit = fake_fit
    (tmp_path / "cache" / f"baseline-{legacy}.ckpt").write_bytes(b"")
    path = st.train(Stage("baseline", "nlvr2", "pre.pt", None, 3000, c.baseline_lr))
    assert path.name == f"baseline-{legacy}.ckpt"
    for seed, padding in ((0, "max_length"), (1, "longest"), (1, "max_length")):
        parts = ["ft_control", "pre.pt", "b.ckpt", "None", None, 300, c.finetune_lr, seed, c.batch_size]
        if padding != "longest":
            parts.append({"padding": padding, "max_text_len": c.max_text_len})
        key[(seed, padding)] = study.cache_key(*parts)
    assert len(set(key.values())) == 3


def test_fine_tune_cache_keys_are_the_ones_the_cached_checkpoints_carry(tmp_path):
    """The fine-tunes' schedules feed their cache keys: built through `ablation` they must hash as before (these
    keys were computed by the study before its settings came from the ablation table)."""
    st = study.Study(StudyConfig(), tmp_path, False, "cpu", 0)
    c = st.cfg

    def fake_fit(label, model, dm, steps, seed=None):
        raise AssertionError("cached stages must not train")

    st.fit = fake_fit
    golden = {
        "ft_control": "0f68e4db609c",
        "ft_pumer_real": "2188f944ea99",
        "ft_pumer_pads_first": "0b6f4490d134",
        "ft_pumer_no_text": "f7caa01663e4",
    }
    schedules = finetune_schedules(c)
    assert list(schedules) == list(golden)
    for name in schedules:
        (tmp_path / "cache" / f"{name}-{golden[name]}.ckpt").write_bytes(b"")
    arms = finetunes(c, "pre.pt", "base.ckpt")
    arms.train(st, schedules, 200, seeds=(1,))
    assert {name: [p.name for p in paths] for name, paths in arms.checkpoints.items()} == {
        name: [f"{name}-{key}.ckpt"] for name, key in golden.items()
    }


def test_ablation_rows_come_from_the_one_ablation_table():
    """Rows named after an ablation are `ablation` of the PuMer setting, with the table's meaning: ``no_prune``
    keeps every image token and merges image and text (the row once called ``merge_only``)."""
    cfg = StudyConfig()
    for chosen in cfg.policies:
        free = free_settings(cfg, chosen, num_layers=4)
        pumer = cfg.schedule(text_merge_policy=chosen)
        assert "merge_only" not in free
        for name in ("no_prune", "random_prune", "cls_prune"):
            assert free[name] == (ABLATIONS[name][0], ablation(pumer, name))
        assert free["prune_only"] == (ABLATIONS["prune_only"][0], ablation(cfg.schedule(), "prune_only"))
        no_prune = free["no_prune"][1]
        assert no_prune.keep_ratio == 1.0 and no_prune.merge_ratio == 0.2 and no_prune.text_merge_ratio == 0.2
        assert free["pumer_no_text"][1] == ablation(cfg.schedule(), "no_text_merge")
        assert free["random_keep_0.5"][1] == ablation(
            cfg.schedule(text_merge_policy=chosen, keep_ratio=0.5), "random_prune"
        )
        assert free["baseline"][1] is None
        # the pruning control by placement: one row pair per block but the last, the reducer there alone
        placed = {name: sched for name, (_, sched) in free.items() if "@block" in name}
        assert sorted(placed) == sorted(f"{r}keep_0.5@block{b}" for r in ("", "random_") for b in (0, 1, 2))
        for b in (0, 1, 2):
            text = dataclasses.replace(pumer, keep_ratio=0.5, layers=[b])
            assert placed[f"keep_0.5@block{b}"] == text
            assert placed[f"random_keep_0.5@block{b}"] == ablation(text, "random_prune")
    assert not any("@block" in name for name in free_settings(StudyConfig(placement_keep=None), "real", 4))


def test_study_code_is_stages_of_at_most_80_lines():
    """A driver of named stages: no file over 600 lines, no function longer than 80 lines, no ``# fmt: skip``;
    reducers swapped only by ``backbone.using``; FLOPs and time only through `pumer_lightning.lab`, weights only
    through the one loader."""
    files = sorted(Path(study.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"config.py", "train.py", "evaluate.py", "report.py", "__main__.py"}
    for path in files:
        source = path.read_text()
        functions = [
            n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        assert [
            (f.name, f.end_lineno - f.lineno + 1) for f in functions if f.end_lineno - f.lineno > 79
        ] == []
        assert len(source.splitlines()) <= 600 and "fmt: skip" not in source, path.name
        assert not re.search(r"\.reducer\s*=[^=]", source) and "FlopCounterMode" not in source, path.name
        assert "interleaved_times(" not in source and "torch.load(" not in source, path.name


def test_fine_tune_batches_pad_texts_to_max_text_len(tmp_path, monkeypatch):
    """The fine-tuning and evaluation batches pad every text to max_text_len (the official fixed padding that
    ``pads_first`` is defined against); the shared pre-training and baseline keep the batch-longest default."""
    monkeypatch.setitem(
        study.BUDGETS,
        "tiny",
        Budget(pretrain_steps=1, baseline_steps=1, finetune_steps=1, num_train=32, num_val=16, num_test=16),
    )
    st = study.Study(
        StudyConfig(budget="tiny", preset="vilt_tiny", max_text_len=14), tmp_path, False, "cpu", 0
    )
    adaptation_world(st)
    dm_fixed, dm_loose = st.datamodule("nlvr2", padding="max_length"), st.datamodule("nlvr2")
    fixed = next(iter(dm_fixed.eval_dataloader(dm_fixed.val_split)))
    loose = next(iter(dm_loose.eval_dataloader(dm_loose.val_split)))
    assert fixed["input_ids"].shape[1] == 14 and loose["input_ids"].shape[1] < 14
    n = loose["input_ids"].shape[1]
    assert torch.equal(fixed["input_ids"][:, :n], loose["input_ids"])
    assert fixed["attention_mask"][:, n:].sum() == 0
    assert StudyConfig().text_padding == "max_length"


def test_chance_is_the_best_constant_answer_per_type():
    nlvr2 = [{"labels": torch.tensor([1, 0, 1, 1]), "meta": [{"statement_type": t} for t in "aabb"]}]
    assert chance(nlvr2, num_classes=2) == {"a": 0.5, "b": 1.0}
    vqa = [
        {"labels": torch.tensor([[1.0, 0.0], [0.6, 0.3], [0.0, 1.0]]), "meta": [{"statement_type": "x"}] * 3}
    ]
    assert chance(vqa, num_classes=2)["x"] == pytest.approx(1.6 / 3)


def test_budgets_fit_their_promises():
    """The default budget is what `make study` runs; its stages must keep their order of magnitude."""
    default = study.BUDGETS["default"]
    assert default.finetune_steps < default.baseline_steps
    assert default.num_test >= 3 * 300  # at least 300 examples per statement type
    # "long" differs from the default in its baseline only, so it reuses the default's data and pre-training
    long = study.BUDGETS["long"]
    assert long.baseline_steps > default.baseline_steps
    assert dataclasses.replace(long, baseline_steps=default.baseline_steps) == default


def test_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch):
    monkeypatch.setitem(
        study.BUDGETS,
        "tiny",
        Budget(pretrain_steps=3, baseline_steps=3, finetune_steps=2, num_train=96, num_val=48, num_test=48),
    )
    cfg = StudyConfig(
        budget="tiny",
        preset="vilt_tiny",
        batch_size=16,
        keep_sweep=(0.5, 0.7),
        seeds=(0, 1),
        distil_seeds=(0,),
    )
    out = tmp_path / "out"
    result = run_study(cfg, tmp_path / "work", out, workers=0, timing_rounds=1)
    stored = json.loads((out / "shapes_tiny.json").read_text())
    assert stored["settings"] == json.loads(json.dumps(result["settings"]))
    assert (out / "shapes_tiny.md").read_text().startswith("# PuMer accuracy study")
    assert (out / "shapes_tiny.png").stat().st_size > 0
    names = [s["name"] for s in result["settings"]]
    chosen = result["policy_choice"]["chosen"]
    assert chosen in ("real", "pads_first") and set(result["policy_choice"]["validation"]) == {
        "real",
        "pads_first",
    }
    for required in (
        "baseline",
        "pumer_real",
        "pumer_pads_first",
        "pumer_pads_first_longest",
        "pumer_no_text",
        "prune_only",
        "no_prune",
        "random_prune",
        "cls_prune",
        "keep_0.5",
        "random_keep_0.5",
        "keep_0.5_no_text",
        "random_keep_0.5_no_text",
        "ft_pumer_real",
        "ft_pumer_pads_first",
        "ft_pumer_no_text",
        "ft_control",
        "ft_control:eval_pumer",
        f"ft_pumer_{chosen}:eval_off",
        f"ft_pumer_{chosen}:eval_random",
        "ft_pumer_distil",
    ):
        assert required in names
    assert "merge_only" not in names
    by = {s["name"]: s for s in result["settings"]}
    pumer = by[f"pumer_{chosen}"]
    # the schedule column is ReducerSchedule's own one-line form
    assert pumer["schedule"] == str(cfg.schedule(text_merge_policy=chosen))
    assert by["baseline"]["schedule"] == "off"
    assert by["no_prune"]["schedule"] == str(ablation(cfg.schedule(text_merge_policy=chosen), "no_prune"))
    assert by["ft_control"]["schedule"] == str(ReducerSchedule()) == "off"
    assert by["baseline"]["flops_ratio"] == 1.0
    assert pumer["flops_ratio"] > 1.0 and by["keep_0.5"]["flops_ratio"] > pumer["flops_ratio"]
    # the policies move the same number of tokens: same FLOPs
    assert by["pumer_real"]["gflops_per_example"] == by["pumer_pads_first"]["gflops_per_example"]
    # the same budget costs the same FLOPs whichever tokens are chosen, and fine-tuned weights cost the same
    assert by["random_prune"]["gflops_per_example"] == pytest.approx(pumer["gflops_per_example"], rel=0.02)
    assert by[f"ft_pumer_{chosen}"]["gflops_per_example"] == pumer["gflops_per_example"]
    assert by["ft_control"]["gflops_per_example"] == by["baseline"]["gflops_per_example"]
    # the control reduced at test costs what PuMer costs, and is scored seed by seed like the control
    assert by["ft_control:eval_pumer"]["gflops_per_example"] == pumer["gflops_per_example"]
    assert by["ft_control:eval_pumer"]["schedule"] == pumer["schedule"] and by["ft_control:eval_pumer"][
        "seeds"
    ] == [0, 1]
    assert pumer["image_tokens_per_layer"][0] > pumer["image_tokens_per_layer"][-1]
    # fine-tuned rows average the seeds, with the seed spread in their standard error
    assert by["ft_control"]["seeds"] == [0, 1] and len(by["ft_control"]["learned"]["per_seed"]) == 2
    assert by["ft_pumer_distil"]["seeds"] == [0] and "seeds" not in by["baseline"]
    for s in result["settings"]:
        assert s["all"]["n"] == 48 and 0.0 <= s["all"]["acc"] <= 1.0
        assert set(s["by_type"]) == {"shape", "color", "exist"}
        assert s["learned"]["se"] >= s["learned"]["se_sample"]
    comparisons = result["comparisons"]
    assert {
        "pumer_ft_minus_control_ft",
        "pumer_ft_real_minus_control_ft",
        "pumer_ft_pads_first_minus_control_ft",
        "pumer_ft_no_text_minus_control_ft",
        "random_keep0.5_minus_pumer_keep0.5",
        "pumer_ft_minus_control_ft_eval_pumer",
        "pumer_free_pads_first_longest_minus_baseline",
    } <= set(comparisons)
    assert comparisons["pumer_ft_minus_control_ft"]["seeds"] == 2
    placement = {k: c for k, c in comparisons.items() if k.startswith("placement_block")}
    assert [(c["a"], c["b"]) for c in placement.values()] == [
        (f"random_keep_0.5@block{b}", f"keep_0.5@block{b}") for b in (0, 1, 2)
    ]
    assert (
        by["keep_0.5@block0"]["image_tokens_per_layer"][1]
        < by["keep_0.5@block0"]["image_tokens_per_layer"][0]
    )
    assert "The pruning control by placement" in (out / "shapes_tiny.md").read_text()
    assert comparisons["pumer_distil_ft_minus_control_ft"]["seeds"] == 1
    assert set(result["targets"]) == {
        "training_free_loss_at_most_5",
        "finetuned_within_1_point",
        "random_5_below_text_at_keep_0.5",
    }
    assert "Text-merge policy chosen on validation" in (out / "shapes_tiny.md").read_text()
    # the loss check: baseline and control (off, training-free PuMer), the chosen PuMer fine-tune (on, off)
    check = result["loss_check"]
    assert [(c["weights"], c["reducer"], c["seeds"]) for c in check] == [
        ("baseline", "off", 1),
        ("baseline", "PuMer (training-free)", 1),
        ("ft_control", "off", 2),
        ("ft_control", "PuMer (training-free)", 2),
        (f"ft_pumer_{chosen}", "PuMer (as trained)", 2),
        (f"ft_pumer_{chosen}", "off", 2),
    ]
    learned = result["learned_types"] or ["shape", "color", "exist"]
    val = result["validation"]["by_type"]
    base_val = sum(val[t]["acc"] * val[t]["n"] for t in learned) / sum(val[t]["n"] for t in learned)
    assert check[0]["score"] == pytest.approx(base_val)
    assert all(c["loss"] > 0 and len(c["loss_per_seed"]) == c["seeds"] for c in check)
    assert "Validation loss (the loss fine-tuning minimises)" in (out / "shapes_tiny.md").read_text()
    assert all(st["chance"] == 0.5 for st in result["validation"]["by_type"].values())
    # a second run finds every stage in the cache and trains nothing
    again = run_study(cfg, tmp_path / "work", out, workers=0, timing_rounds=1)
    assert again["train_seconds"] == {}


def test_vqa_variant_scores_with_soft_labels(tmp_path, monkeypatch):
    """``--task vqa2``: the VQA model trained from scratch is the baseline; scores are VQA scores and chance is the
    best constant answer of each question type (not 0.5)."""
    monkeypatch.setitem(
        study.BUDGETS,
        "tiny",
        Budget(pretrain_steps=2, baseline_steps=2, finetune_steps=1, num_train=60, num_val=30, num_test=30),
    )
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
        study.BUDGETS,
        "tiny",
        Budget(pretrain_steps=2, baseline_steps=2, finetune_steps=1, num_train=60, num_val=30, num_test=30),
    )
    st = study.Study(StudyConfig(budget="tiny", preset="vilt_tiny", batch_size=16), tmp_path, False, "cpu", 0)
    adaptation_world(st)
    stage = Stage("pretrain", "vqa2", None, None, 2, 1e-3)
    first = st.train(stage, path=tmp_path / "a.ckpt")
    torch.rand(1000)  # disturb the global generator
    second = st.train(stage, path=tmp_path / "b.ckpt")
    a = torch.load(first, weights_only=False)["state_dict"]
    b = torch.load(second, weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_command_line_builds_the_study_config(monkeypatch):
    """``python -m pumer_lightning.study`` flags reach the `StudyConfig` that keys the cache and names the outputs."""
    seen = {}
    monkeypatch.setattr(study.run, "run_study", lambda cfg, *args: seen.update(cfg=cfg, args=args))
    args = ["--protocol", "adaptation", "--budget", "long", "--task", "vqa2", "--distil-seeds", "0", "2"]
    study.main([*args, "--device", "cpu"])
    cfg = seen["cfg"]
    assert (cfg.budget, cfg.task, cfg.distil_seeds) == ("long", "vqa2", (0, 2))
    study.main(["--protocol", "adaptation", "--device", "cpu"])
    assert seen["cfg"].distil_seeds == () and seen["cfg"].budget == "default" and seen["cfg"].task == "nlvr2"
