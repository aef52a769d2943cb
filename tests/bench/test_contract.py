"""The bench on the tiny presets: every experiment writes a JSON that holds the contract, plus table and plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pumer_lightning.bench import EXPERIMENTS, REQUIRED_FIELDS, Options, get_experiment, run_bench
from pumer_lightning.bench.experiments import ABLATIONS
from pumer_lightning.bench.report import TRAIN_FIELDS, load, markdown, readme_table, summary
from pumer_lightning.models import build_backbone

ROOT = Path(__file__).resolve().parents[2]
FULL_SETTINGS_EXP = (
    "meter_nlvr2"  # measured with every setting; the others with baseline, pumer, random_prune
)


def _options(out: Path, **kw) -> Options:
    # one thread: tiny models gain nothing from two, and spinning threads suffer on a shared machine
    base = dict(
        out_dir=out,
        rounds=2,
        train_rounds=1,
        warmup=0,
        verbose=False,
        plot=False,
        tiny=True,
        threads=1,
        kernel_count="none",  # inductor compiles for minutes on a CPU: test_compile counts the kernels
        cpu_bf16="off",  # one precision per run: the bf16 rows have their own tests (test_precision.py)
    )
    base.update(kw)
    return Options(**base)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """Run every tiny experiment once (in-process) and load what it wrote."""
    out = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    loaded = {}
    for name in EXPERIMENTS:
        full = name == FULL_SETTINGS_EXP
        opts = _options(
            out,
            settings=None if full else ["pumer", "random_prune"],
            rounds=2 if full else 1,
            keep_sweep=(0.5, 0.9) if full else (),
            plot=full,
        )
        (result,) = run_bench([name], opts)
        path = out / f"{result['name']}.json"
        loaded[name] = (json.loads(path.read_text()), path)
    return loaded


def _by_name(result: dict) -> dict[str, dict]:
    return {s["name"]: s for s in result["settings"]}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_json_contract(results, name):
    data, path = results[name]
    assert path.name == f"tiny_{name}_cpu_b8.json"
    assert path.with_suffix(".md").exists()
    assert data["exp"] == f"tiny_{name}" and data["tiny"] is True and data["batch_size"] == 8
    assert isinstance(data["settings"], list) and len(data["settings"]) >= 3
    for s in data["settings"]:
        missing = [f for f in REQUIRED_FIELDS if f not in s]
        assert not missing, f"{s.get('name')}: missing {missing}"
        assert s["examples_per_s"] > 0 and math.isfinite(s["examples_per_s"])
        assert s["examples_per_s_min"] <= s["examples_per_s"] <= s["examples_per_s_max"]
        assert s["flops_per_example"] > 0 and s["flops_ratio"] > 0
        assert s["peak_mem_bytes"] > s["activation_peak_bytes"] > 0
        assert set(s["tokens_per_layer"]) == {"image", "text"}
        assert s["tokens_match_plan"] is True
        assert s["flops_uncounted_ops"] == []
        assert 0.0 <= s["reducer_time_share"] < 1.0
        missing = [f for f in TRAIN_FIELDS if f not in s]
        assert not missing, f"{s.get('name')}: missing {missing}"
        assert s["train_peak_mem_bytes"] > s["train_activation_peak_bytes"] > 0
        assert s["train_examples_per_s"] > 0 and 0 < s["train_activation_mem_bound"] <= 1.0
        assert s["ops_per_forward"] > 0
        assert s["kernels_per_step"] is None or s["kernels_per_step"] > 0
        assert (
            len(s["examples_per_s_rounds"])
            == data["protocol"]["rounds"]
            == (2 if name == FULL_SETTINGS_EXP else 1)
        )
    hw, sw = data["hardware"], data["software"]
    assert hw["device"] == "cpu" and hw["torch_threads"] == data["protocol"]["threads"] == 1
    assert sw["torch"] == torch.__version__ and sw["transformers"]
    assert data["protocol"]["inference_mode"] is True and data["protocol"]["precision"] == "fp32"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_ratios_are_taken_against_the_baseline(results, name):
    data, _ = results[name]
    settings = _by_name(data)
    base = settings["baseline"]
    assert base["speedup"] == 1.0 and base["flops_ratio"] == 1.0 and base["reducer_time_share"] == 0.0
    for s in data["settings"]:
        assert s["speedup"] == pytest.approx(s["examples_per_s"] / base["examples_per_s"], rel=1e-9)
        assert s["flops_ratio"] == pytest.approx(base["flops_per_example"] / s["flops_per_example"], rel=1e-9)
        assert s["bound_attainment"] == pytest.approx(s["speedup"] / s["flops_ratio"], rel=1e-9)
        best = s["examples_per_s_max"] / base["examples_per_s_max"]
        assert s["speedup_best"] == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_reduced_settings_follow_the_plan_and_cost_less(results, name):
    data, _ = results[name]
    exp = get_experiment(name, tiny=True)
    settings = _by_name(data)
    n_image, n_text, depth = data["inputs"]["image_tokens"], exp.text_len, data["inputs"]["num_layers"]
    image, text = exp.released.tokens_per_layer(n_image, n_text, depth)
    assert settings["pumer"]["tokens_per_layer"] == {"image": image, "text": text}
    assert settings["baseline"]["tokens_per_layer"]["image"] == [n_image] * depth
    # random pruning removes exactly as many tokens as the released setting
    assert settings["random_prune"]["tokens_per_layer"] == settings["pumer"]["tokens_per_layer"]
    for s in ("pumer", "random_prune"):
        assert settings[s]["flops_per_example"] < settings["baseline"]["flops_per_example"]
        assert settings[s]["reducer_time_share"] > 0.0


def test_inputs_are_shaped_like_the_task(results):
    for name, (data, _) in results.items():
        inputs = data["inputs"]
        assert inputs["text_len"] == (32 if "vqa2" in name else 40)
        assert inputs["images_per_example"] == (2 if "nlvr2" in name else 1)
        lengths = inputs["text_real_lengths"]
        assert max(lengths) == inputs["text_len"] and len(set(lengths)) > 1


def test_nlvr2_counts_both_image_passes(results):
    """Two backbone passes per NLVR2 example: its FLOPs are about twice the single-image task's."""
    for family in ("vilt", "meter"):
        nlvr2 = _by_name(results[f"{family}_nlvr2"][0])["baseline"]["flops_per_example"]
        ve = _by_name(results[f"{family}_snli_ve"][0])["baseline"]["flops_per_example"]
        assert 1.9 < nlvr2 / ve < 2.1


def test_full_setting_list_sweep_table_and_plot(results):
    data, path = results[FULL_SETTINGS_EXP]
    settings = _by_name(data)
    released_keep = settings["pumer"]["schedule"]["keep_ratio"]
    assert {"baseline", "pumer", *ABLATIONS} <= set(settings)
    sweep = {s["schedule"]["keep_ratio"] for s in data["settings"] if s["kind"] == "sweep"}
    assert sweep == {0.5, 0.9} - {released_keep}
    assert settings["prune_only"]["schedule"]["merge_ratio"] == 0.0
    assert settings["merge_only"]["schedule"]["keep_ratio"] == 1.0
    assert settings["no_text_merge"]["tokens_per_layer"]["text"] == [40] * data["inputs"]["num_layers"]
    assert path.with_suffix(".png").stat().st_size > 10_000
    table = path.with_suffix(".md").read_text()
    for name in settings:
        assert f"`{name}`" in table
    rendered = readme_table([results[n][0] for n in ("vilt_nlvr2", "meter_nlvr2")], ["baseline", "pumer"])
    assert rendered.count("`pumer`") == 2 and "tiny_vilt_nlvr2 b8" in rendered


def test_memory_counts_weights_and_grows_with_batch(tmp_path):
    (b1, b4) = run_bench(
        ["vilt_vqa2"], _options(tmp_path, settings=["pumer"], keep_sweep=(), batch_sizes=[1, 4], rounds=1)
    )
    weights = sum(p.numel() * p.element_size() for p in build_backbone("vilt_tiny").parameters())
    for result in (b1, b4):
        for s in result["settings"]:
            assert s["peak_mem_bytes"] - s["activation_peak_bytes"] > weights
    base1, base4 = _by_name(b1)["baseline"], _by_name(b4)["baseline"]
    assert 3.0 < base4["activation_peak_bytes"] / base1["activation_peak_bytes"] < 4.5
    assert base4["flops_per_example"] == pytest.approx(base1["flops_per_example"], rel=1e-6)
    sweep = json.loads((tmp_path / "tiny_vilt_vqa2_cpu_batch_sweep.json").read_text())
    assert sweep["batch_sizes"] == [1, 4] and set(sweep["settings"]) == {"baseline", "pumer"}


def test_command_line_entry_point(tmp_path):
    """`python -m pumer_lightning.bench EXP EXP --quick` as `make bench` calls it."""
    cmd = [
        sys.executable, "-m", "pumer_lightning.bench", "tiny_vilt_vqa2", "tiny_meter_snli_ve",
        "--quick", "--rounds", "1", "--out", str(tmp_path), "--no-plot", "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "timing 1 interleaved rounds" in proc.stdout
    for name in ("tiny_vilt_vqa2_cpu_b8", "tiny_meter_snli_ve_cpu_b8"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert [s["name"] for s in data["settings"]] == ["baseline", "pumer"]
        assert data["command"].startswith("python -m pumer_lightning.bench tiny_vilt_vqa2 tiny_meter_snli_ve")
    bad = subprocess.run(
        [sys.executable, "-m", "pumer_lightning.bench", "vilt_nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "unknown bench experiment 'vilt_nope'" in bad.stderr


def test_profile_breaks_time_down_by_op(tmp_path):
    (result,) = run_bench(
        ["vilt_vqa2"], _options(tmp_path, settings=["pumer"], keep_sweep=(), rounds=1, profile=True)
    )
    assert set(result["profile"]) == {"baseline", "pumer"}
    for prof in result["profile"].values():
        shares = [op["share"] for op in prof["ops"]]
        assert prof["total_s"] > 0 and 0 < sum(shares) <= 1 + 1e-9 and shares == sorted(shares, reverse=True)
        assert any("addmm" in op["op"] or "linear" in op["op"] for op in prof["ops"])
    # the pumer.reduce ranges the backbone opens itself around every reduction step
    assert 0 < result["profile"]["pumer"]["ranges"]["pumer.reduce"]["share"] < 1
    assert "pumer.reduce" not in result["profile"]["baseline"]["ranges"]
    assert "Where the time goes" in (tmp_path / f"{result['name']}.md").read_text()


def test_training_step_memory_throughput_and_bound(tmp_path):
    """With autograd kept, activations of every layer stay alive, so reduced layers save memory; the bound weights
    what each part of the model saves for backward by the tokens it sees."""
    (result,) = run_bench(["vilt_nlvr2"], _options(tmp_path, settings=["pumer"], keep_sweep=(), rounds=1))
    settings = _by_name(result)
    base, pumer = settings["baseline"], settings["pumer"]
    weights = sum(
        p.numel() * p.element_size() for p in build_backbone("vilt_tiny", num_token_types=3).parameters()
    )
    for s in settings.values():
        assert s["train_peak_mem_bytes"] > s["peak_mem_bytes"]
        # weights and their gradients are counted before the step; activations are what the step adds
        assert s["train_peak_mem_bytes"] - s["train_activation_peak_bytes"] > 2 * weights
        assert s["train_saved_bytes"] == sum(s["train_saved_bytes_by_part"].values()) > 0
        assert s["train_examples_per_s"] > 0 and len(s["train_examples_per_s_rounds"]) == 1
    assert base["train_activation_mem_ratio"] == base["train_activation_mem_bound"] == 1.0
    assert base["train_speedup"] == 1.0 and base["train_flops_ratio"] == 1.0
    # the reduced blocks keep less, the unreduced first block the same
    assert pumer["train_saved_bytes_by_part"]["3"] < base["train_saved_bytes_by_part"]["3"]
    assert pumer["train_tokens_by_part"]["0"] == base["train_tokens_by_part"]["0"]
    assert pumer["train_tokens_by_part"]["3"] < base["train_tokens_by_part"]["3"]
    assert pumer["train_activation_mem_ratio"] < 1.0 and pumer["train_saved_ratio"] < 1.0
    assert 0.5 < pumer["train_activation_mem_bound"] < 1.0
    # the bound holds: the step keeps what the reducer itself needs on top (tolerance for backward temporaries)
    assert pumer["train_activation_mem_bound"] < pumer["train_activation_mem_ratio"] + 0.02
    assert pumer["train_flops_ratio"] > 1.0
    assert "sum_p S_p * T_p / T0_p" in result["protocol"]["train_memory_bound"]
    table = (tmp_path / f"{result['name']}.md").read_text()
    assert "Training step" in table and "sum_p S_p * T_p / T0_p" in table


def test_report_renders_launch_and_training_fields(results):
    data, _ = results["vilt_nlvr2"]
    pumer = _by_name(data)["pumer"]
    lines = markdown(data).splitlines()
    launch = lines.index("Launch overhead: on a GPU every op that does work is about one kernel launch.")
    training = lines.index("Training step (what fine-tuning with the reducer on pays).")
    launch_row = next(line for line in lines[launch:training] if line.startswith("| `pumer` |"))
    assert f"| {pumer['ops_per_forward']} |" in launch_row
    assert f"| {pumer['reducer_ops_per_step']:.1f} |" in launch_row
    assert any(line.startswith("Ops the released setting adds per forward, by op: aten.") for line in lines)
    train_row = next(line for line in lines[training:] if line.startswith("| `pumer` |"))
    assert f"({100 * (pumer['train_activation_mem_ratio'] - 1):+.0f}%)" in train_row
    assert f"({100 * (pumer['train_activation_mem_bound'] - 1):+.0f}%)" in train_row
    assert f"{pumer['train_speedup']:.2f}×" in train_row
    assert "reducer ops/step" in summary(data) and "train activations" in summary(data)
    rendered = readme_table([data], ["pumer"])
    assert (
        f"| {pumer['reducer_ops_per_step']:.0f} |" in rendered and "training activations (bound)" in rendered
    )


def test_readme_table_renders_results_without_the_new_fields(tmp_path):
    """Results written before ops and training were measured still render (n/a in the new columns)."""
    data, _ = _old_result()
    rendered = readme_table([data])
    assert rendered.count("n/a") >= 3 * len(data["settings"])
    assert "Launch overhead" not in markdown(data) and "Training step" not in markdown(data)


def _old_result() -> tuple[dict, Path]:
    path = ROOT / "results" / "bench" / "vilt_nlvr2_cuda-fp16_b128.json"
    (data,) = load([path])
    for s in data["settings"]:
        for key in [k for k in s if k.startswith(("train_", "ops_", "reducer_ops", "kernels_"))]:
            del s[key]
    return data, path


def test_readme_table_command(results, capsys):
    from pumer_lightning.bench.table import main

    main([str(results[name][1]) for name in ("vilt_vqa2", "meter_vqa2")] + ["--settings", "pumer"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny_")]
    assert len(rows) == 2 and all("`pumer`" in r for r in rows)
    assert "tiny_meter_vqa2 b8" in out and "threads" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal; the GPU path is timed by hand")
def test_cuda_graph_mode_needs_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        run_bench(["vilt_vqa2"], _options(tmp_path, settings=["pumer"], keep_sweep=(), cuda_graph=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_mode_times_replays(tmp_path):
    (result,) = run_bench(
        ["vilt_nlvr2"], _options(tmp_path, settings=["pumer"], keep_sweep=(), cuda_graph=True, threads=None)
    )
    assert result["protocol"]["cuda_graph"] and result["name"].endswith("_graphed")
    assert all(s["reducer_time_share"] is None for s in result["settings"])
