"""The study's paper protocol (docs/study.md#paper-protocol-the-headline): its recipes against the experiment files,
its cache keys, its command line, and an end-to-end run at tiny size (real pre-training command, real trainers)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from pumer_lightning import study
from pumer_lightning.study import run as study_run
from pumer_lightning.study.config import EXPERIMENTS, PAPER_BUDGETS, RECIPES, PaperBudget, PaperConfig
from pumer_lightning.study.train import Arms, pretrained_start, train_first_arms


@pytest.mark.parametrize("task", sorted(RECIPES))
def test_recipes_are_the_experiment_files(task):
    """Each task's recipe, model and world are its experiment file's (chosen there on validation, reducers off),
    and the default budget's N is the file's number of steps."""
    recipe, cfg = RECIPES[task], PaperConfig(task=task)
    y = OmegaConf.merge(
        OmegaConf.load(EXPERIMENTS / "base.yaml"), OmegaConf.load(EXPERIMENTS / f"{recipe.experiment}.yaml")
    )
    init = y.model.init_args
    assert (init.optim.lr, init.optim.lr_mult_head) == (recipe.lr, recipe.head_mult)
    assert init.backbone.preset == cfg.preset and init.backbone.checkpoint.endswith("shapes_pretrain")
    assert tuple(y.shapes.types) == recipe.types and y.shapes.tasks == [task]
    assert (y.shapes.max_objects, y.shapes.min_objects, y.shapes.image_size, y.shapes.patch_size) == (
        cfg.max_objects,
        cfg.min_objects,
        cfg.image_size,
        cfg.patch_size,
    )
    assert (y.data.max_text_len, y.data.batch_size, y.trainer.max_epochs) == (
        cfg.max_text_len,
        cfg.batch_size,
        recipe.epochs,
    )
    assert cfg.n_steps == recipe.epochs * y.shapes.num_train // y.data.batch_size
    assert cfg.schedule() == study.StudyConfig().schedule()  # the schedule of both protocols
    pre = OmegaConf.load(EXPERIMENTS / "shapes_pretrain.yaml")
    assert pre.model.init_args.backbone.preset == cfg.preset and pre.shapes.max_objects == cfg.max_objects


def test_paper_budgets_scale_the_same_design():
    default, gpu = PAPER_BUDGETS["default"], PAPER_BUDGETS["gpu"]
    assert default.pretrain_epochs == 2  # the NLVR2 remedy of docs/experiments.md: 2,000 pre-training steps
    assert gpu.num_train > default.num_train and gpu.num_test > default.num_test
    assert gpu.pretrain_epochs > default.pretrain_epochs
    assert PaperConfig(task="vqa2").n_steps == 1500 and PaperConfig(task="nlvr2").n_steps == 750
    with pytest.raises(ValueError, match="budgets"):
        PaperConfig(budget="long")
    with pytest.raises(ValueError, match="--long-arm"):
        PaperConfig(long_arm="sometimes")


def paper_arms(cfg: PaperConfig, start: Path, start_key: str) -> Arms:
    """The paper protocol's arms as `train_first_arms` builds them, with nothing trained."""
    fake = SimpleNamespace(path=start, key=start_key)
    st = SimpleNamespace(cfg=cfg, train=lambda stage: None)
    arms = train_first_arms(st, fake)
    arms.schedules["pumer_distil"] = cfg.schedule(text_merge_policy="pads_first")
    arms.steps["pumer_distil"] = cfg.n_steps
    return arms


def test_an_arm_cache_key_follows_its_start_recipe_and_teacher(tmp_path):
    """A remade pre-trained start (same directory, new made_by key), another seed or a teacher move an arm to a
    new cache file; the same arm twice has the same one."""
    cfg = PaperConfig(task="nlvr2")
    arms = paper_arms(cfg, tmp_path / "start", "k1")
    keys = {
        "same": arms.stage("pumer_real", 0).key(cfg),
        "again": arms.stage("pumer_real", 0).key(cfg),
        "seed": arms.stage("pumer_real", 1).key(cfg),
        "teacher": arms.stage("pumer_real", 0, tmp_path / "b.ckpt").key(cfg),
    }
    keys["start"] = paper_arms(cfg, tmp_path / "start", "k2").stage("pumer_real", 0).key(cfg)
    assert keys["same"] == keys["again"] and len(set(keys.values())) == 4
    stage = arms.stage("pumer_real", 0)
    assert (stage.lr, stage.head_mult, stage.padding) == (2e-4, 10.0, "max_length")


def test_arm_cache_keys_are_the_ones_the_cached_checkpoints_carry():
    """The arms' cache keys hash the start's path and key, the recipe, the reducer, the steps, the seed and the
    teacher exactly as the runs that made the cached checkpoints did: golden keys (computed by the code that
    trained them) and an independent recomputation of the hash."""
    cfg = PaperConfig(task="nlvr2")
    arms = paper_arms(cfg, Path("/w/paper/pretrained/default"), "0123456789abcdef")
    teacher = Path("/w/paper/cache/paper-nlvr2-baseline-abc.ckpt")
    stages = {
        "3f99769ed93f": arms.stage("baseline", 0),
        "539f92d4166c": arms.stage("pumer_real", 2),
        "c178a6333f18": arms.stage("pumer_distil", 1, teacher),
    }
    for golden, stage in stages.items():
        sched = dataclasses.asdict(stage.schedule) if stage.schedule is not None else None
        parts = [stage.name, "/w/paper/pretrained/default", "None", str(stage.distill), sched, 750, 2e-4]
        parts += [stage.seed, 64, {"padding": "max_length", "max_text_len": 16}]
        parts.append({"head_mult": 10.0, "start": "0123456789abcdef"})
        text = json.dumps(parts, sort_keys=True, default=str)
        assert stage.key(cfg) == hashlib.sha256(text.encode()).hexdigest()[:12] == golden
    assert [s.name for s in stages.values()] == [
        f"paper-nlvr2-{a}" for a in ("baseline", "pumer_real", "pumer_distil")
    ]


def test_the_pretrained_start_is_keyed_by_its_files_and_overrides(tmp_path, monkeypatch):
    """The pre-trained start's ``made_by.json`` key: the two experiment files' contents and the overrides the
    study passes (its captions world, runs and output under ``<work>``), recomputed here independently."""
    from pumer_lightning.tasks import pretrain

    seen = {}

    def fake_ensure(files, out, overrides=(), make=True):
        seen.update(files=files, out=out, overrides=overrides)
        key = pretrain.pretrain_key(files, [*overrides, str(out)])
        return pretrain.Pretrained(Path(out), "cmd", key, False, 0.0, {})

    monkeypatch.setattr(pretrain, "ensure_pretrained", fake_ensure)
    work = tmp_path / "paper"
    st = SimpleNamespace(cfg=PaperConfig(task="vqa2", budget="quick"), work=work, device=torch.device("cpu"))
    made = pretrained_start(st, fresh=False)
    assert [Path(f).name for f in seen["files"]] == ["base.yaml", "shapes_pretrain.yaml"]
    overrides = [
        f"--shapes.root={work}/captions-quick",
        "--shapes.num_train=1280",
        "--shapes.num_val=150",
        "--shapes.num_test=150",
        "--shapes.seed=0",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={work}/runs",
        f"--trainer.logger.init_args.save_dir={work}/runs",
        "--data.num_workers=1",
        "--seed_everything=0",
    ]
    assert list(seen["overrides"]) == overrides and seen["out"] == work / "pretrained" / "quick"
    texts = [(EXPERIMENTS / name).read_text() for name in ("base.yaml", "shapes_pretrain.yaml")]
    blob = json.dumps([texts, [*overrides, str(work / "pretrained" / "quick")]])
    assert made.key == hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_command_line_runs_the_paper_protocol_by_default(monkeypatch):
    seen = {}
    monkeypatch.setattr(study_run, "run_paper", lambda cfgs, *args: seen.update(cfgs=cfgs))
    study.main(["--device", "cpu"])
    assert [(c.task, c.budget, c.long_arm) for c in seen["cfgs"]] == [
        ("vqa2", "default", "auto"),
        ("nlvr2", "default", "auto"),
    ]
    study.main(["--device", "cpu", "--task", "nlvr2", "--budget", "quick", "--long-arm", "always"])
    assert [(c.task, c.budget, c.long_arm) for c in seen["cfgs"]] == [("nlvr2", "quick", "always")]
    with pytest.raises(SystemExit):
        study.main(["--budget", "long"])  # an adaptation budget
    with pytest.raises(SystemExit):
        study.main(["--protocol", "adaptation", "--task", "all"])


@pytest.mark.slow
def test_paper_protocol_end_to_end_at_tiny_size(tmp_path, monkeypatch):
    """Both tasks at tiny size: the pre-trained start made once by the pre-training command and shared, every arm
    over 2 seeds, the choices made on validation, the report; a second run trains nothing and only re-evaluates."""
    monkeypatch.setitem(PAPER_BUDGETS, "tiny", PaperBudget(1, 64, num_train=32, num_val=24, num_test=24))
    cfgs = [
        PaperConfig(
            budget="tiny",
            task=t,
            batch_size=16,
            seeds=(0, 1),
            keep_sweep=(0.5,),
            long_arm="always",
            pretrain_workers=0,
        )
        for t in ("vqa2", "nlvr2")
    ]
    work, out = tmp_path / "work", tmp_path / "out"
    first = study.run_paper(cfgs, work, out, workers=0, timing_rounds=1)
    for task, r in first.items():
        stored = json.loads((out / f"paper_{task}_tiny.json").read_text())
        assert stored["settings"] == json.loads(json.dumps(r["settings"]))
        md = (out / f"paper_{task}_tiny.md").read_text()
        assert md.startswith("# PuMer accuracy study, paper protocol") and "Protocol: **paper" in md
        assert f"--protocol paper --task {task} --budget tiny --long-arm always" in r["command"]
        assert r["arms"] == ["baseline", "pumer_real", "pumer_pads_first", "pumer_distil", "pumer_2n"]
        by = {s["name"]: s for s in r["settings"]}
        n = cfgs[0].n_steps if task == "vqa2" else cfgs[1].n_steps
        for arm in r["arms"]:
            row = by[f"arm:{arm}"]
            assert row["seeds"] == [0, 1] and len(row["learned"]["per_seed"]) == 2
            assert row["steps"] == (2 * n if arm == "pumer_2n" else n)
            assert row["distilled"] == (
                arm == "pumer_distil" or (arm == "pumer_2n" and r["long_arm"]["repeats"] == "pumer_distil")
            )
            assert len(row["train_seconds"]) == 2 and row["train_examples_per_s"] > 0
            assert row["all"]["n"] == 24
        assert by["arm:baseline"]["flops_ratio"] == 1.0 and by["arm:pumer_real"]["flops_ratio"] > 1.0
        chosen = r["chosen_arm"]["arm"]
        assert chosen in ("pumer_" + r["policy_choice"]["chosen"], "pumer_distil", "pumer_2n")
        val = r["arms_validation"]
        assert val[chosen]["acc"] == max(
            val[a]["acc"] for a in ("pumer_" + r["policy_choice"]["chosen"], "pumer_distil", "pumer_2n")
        )
        # the training-free rows ran on each seed's baseline, and the baseline row is the baseline arm
        assert (
            by["baseline"]["seeds"] == [0, 1] and by["baseline"]["learned"] == by["arm:baseline"]["learned"]
        )
        assert {"pumer_real", "random_prune", "keep_0.5", "random_keep_0.5", "keep_0.5@block0"} <= set(by)
        comps = r["comparisons"]
        assert comps[f"{chosen}_minus_baseline"]["seeds"] == 2
        assert {"random_keep0.5_minus_pumer_keep0.5", "pumer_free_minus_baseline"} <= set(comps)
        assert set(r["targets"]) == {
            "training_free_loss_at_most_5",
            "finetuned_within_1_point",
            "random_5_below_text_at_keep_0.5",
        }
        assert r["targets"]["finetuned_within_1_point"]["value"] == pytest.approx(
            100 * comps[f"{chosen}_minus_baseline"]["diff"]
        )
        assert len(r["trained_now"]) == 10  # 5 arms x 2 seeds
    assert first["vqa2"]["pretrained"]["made_now"] and not first["nlvr2"]["pretrained"]["made_now"]
    assert first["vqa2"]["pretrained"]["key"] == first["nlvr2"]["pretrained"]["key"]
    assert Path(first["nlvr2"]["pretrained"]["path"], "made_by.json").is_file()
    # everything cached: the rerun trains nothing (no arm, no pre-training) and writes the same choices
    again = study.run_paper(cfgs, work, out, workers=0, timing_rounds=1)
    for task, r in again.items():
        assert r["trained_now"] == {} and not r["pretrained"]["made_now"]
        assert r["chosen_arm"] == first[task]["chosen_arm"]
        assert r["comparisons"] == first[task]["comparisons"]
