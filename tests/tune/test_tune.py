"""``make tune`` end to end on a tiny model: a real fit checkpoint, real shards, a real Lightning trainer.

One module-scoped search (``tuned``) on the session's shapes VQA shards (40 validation and 40 test examples, 5
batches of 8) with a tiny space; the tests read what it wrote, run it again from its cache, and feed its YAML back
through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pumer_test_utils import run_args

from pumer_lightning.cli import PumerCLI
from pumer_lightning.tune import run, schedule_key

TINY_SEARCH = (
    "--candidates=5",
    "--eta=2",
    "--min-finalists=2",
    "--rounds=1",
    "--final-rounds=1",
    "--timing-batches=1",
    "--batch-size=8",
    "--generations=1",
    "--children=2",
    "--parents=1",
    "--layers=1,2;0,1",
    "--keep=0.6,0.8,1",
    "--merge=0,0.3",
    "--text-merge=0,0.2",
    "--device=cpu",
    "--preload-gib=0.5",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose 10-100x to them when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> dict:
    """A checkpoint of ``vilt_tiny`` fitted for a few steps with PuMer on, as ``make exp`` leaves it."""
    out = tmp_path_factory.mktemp("tune_runs")
    args = run_args(
        "vqa2",
        "vilt_tiny",
        shapes,
        out / "runs",
        "--trainer.limit_train_batches=3",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
    )
    cli = PumerCLI(args=["fit", *args])
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    assert best.is_file() and best.parent.parent.name == "version_0"
    return {"args": args, "ckpt": best, "out": out}


@pytest.fixture(scope="module")
def tuned(trained) -> dict:
    results = trained["out"] / "results"
    result = run([*trained["args"], *TINY_SEARCH, f"--out={results}", "--out-name=tiny"])
    return {"result": result, "results": results, **trained}


def test_search_writes_the_front_the_plot_the_yaml_and_hparams(tuned):
    result, results = tuned["result"], tuned["results"]
    for ext in ("json", "md", "png", "yaml"):
        assert (results / f"tiny.{ext}").stat().st_size > 0
    saved = json.loads((results / "tiny.json").read_text())
    assert saved["recommendation"]["key"] == result["recommendation"]["key"]
    # the default checkpoint was the run's best; every point was kept, each with accuracy and a timing
    assert saved["experiment"]["checkpoint"] == str(tuned["ckpt"])
    points = saved["points"]
    roles = [p["role"] for p in points]
    assert roles.count("reference") == 1 and roles.count("experiment") == 1 and len(points) >= 7
    assert any(p["generation"] == 1 for p in points)
    assert all(p["accuracy"] and (p["timing"].get("screen") or p["timing"].get("final")) for p in points)
    # successive halving: a prefix of 3 batches first, the whole split (40 examples) for the finalists
    gen0 = [r for r in saved["rungs"] if r["generation"] == 0]
    assert [r["examples"] for r in gen0] == [24, 40] and gen0[1]["points"] < gen0[0]["points"]
    finalists = [p for p in points if p["finalist"]]
    assert all(p["accuracy"][-1]["n"] == 40 and p["timing"]["final"] for p in finalists)
    assert any(p["on_front"] for p in finalists)
    # per-example standard errors, drops paired against the unreduced model
    reference = next(p for p in points if p["role"] == "reference")
    assert reference["accuracy"][-1]["drop"] == 0 and reference["accuracy"][-1]["se_kind"] == "per-example"
    # the recommendation: the fastest, in one playoff session, of the fastest finalists within the budget
    playoff = saved["playoff"]
    assert {"reference", "experiment"} <= {r["role"] for r in playoff}
    contenders = [r for r in playoff if r["contender"]]
    assert all(r["accuracy"]["drop"] + r["accuracy"]["drop_se"] <= 1.0 for r in contenders)
    fastest = max(contenders, key=lambda r: r["timing"]["speedup"])
    assert saved["recommendation"]["key"] == fastest["key"] == next(r["key"] for r in playoff if r["chosen"])
    # the check on the test split, and every section of the report
    assert saved["check"]["split"] == "test" and saved["check"]["examples"] == 40
    text = (results / "tiny.md").read_text()
    for heading in ("## Recommendation", "## Check on the test split", "## Pareto front", "## The search"):
        assert heading in text
    events = list(Path(result["hparams_dir"]).rglob("events.out.tfevents.*"))
    assert len(events) >= len(points)


def test_a_second_run_measures_nothing_new(tuned):
    again = run([*tuned["args"], *TINY_SEARCH, f"--out={tuned['results']}", "--out-name=tiny"])
    assert again["cache"]["evaluations"] == 0 and again["cache"]["timing_sessions"] == 0
    assert again["cache"]["misses"] == {"accuracy": 0, "timing": 0}
    assert again["recommendation"]["key"] == tuned["result"]["recommendation"]["key"]
    assert [p["key"] for p in again["points"]] == [p["key"] for p in tuned["result"]["points"]]
    assert all(p["accuracy"][-1]["cached"] for p in again["points"])
    assert "measured now: 0 evaluations, 0 timing sessions" in (tuned["results"] / "tiny.md").read_text()


def test_the_yaml_fragment_sets_that_schedule_through_the_cli(tuned, tmp_path):
    fragment = tuned["results"] / "tiny.yaml"
    expected = tuned["result"]["recommendation"]["key"]
    for form in (["-c", str(fragment)], [f"--config={fragment}"]):
        cli = PumerCLI(args=[*tuned["args"], *form], run=False)
        assert schedule_key(cli.model.backbone.reducer) == expected


def test_missing_checkpoint_says_to_run_make_exp_first(trained, tmp_path):
    args = [a for a in trained["args"] if "save_dir" not in a and "default_root_dir" not in a]
    empty = [f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(SystemExit, match=r"no trained checkpoint: .*make exp EXP=shapes_vilt"):
        run([*args, *empty, "--device=cpu"])
    with pytest.raises(SystemExit, match=r"--ckpt nope.ckpt does not exist"):
        run([*trained["args"], "--ckpt=nope.ckpt"])


def test_a_checkpoint_of_another_preset_names_the_preset_it_was_trained_with(trained):
    with pytest.raises(SystemExit, match=r"does not fit .*preset 'vilt_small'.*trained preset 'vilt_tiny'"):
        run(
            [
                *trained["args"],
                "--model.backbone.preset=vilt_small",
                *TINY_SEARCH,
                "--check-split=none",
                f"--out={trained['out']}/mismatch",
            ]
        )


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--keep=0.5:1.5", r"--keep 0.5:1.5: keep_ratio must be in \(0, 1\], got 1.05"),
        ("--merge=0,0.7", r"--merge 0,0.7: merge_ratio must be in \[0, 0.5\], got 0.7"),
        ("--layers=1,9", r"--layers \[1, 9\]: block index \[9\] out of range"),
        (
            "--text-merge-policy=real,all",
            r"--text-merge-policy 'real,all': expected a comma list of real, pads_first",
        ),
    ],
)
def test_bad_search_space_values_name_the_flag(trained, flag, message):
    with pytest.raises(SystemExit, match=message):
        run([*trained["args"], flag, "--device=cpu"])
