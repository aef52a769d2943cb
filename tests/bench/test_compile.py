"""Static shapes: the reduced tiny models compile with ``torch.compile(fullgraph=True)`` and the bench times them."""

from __future__ import annotations

import pytest
import torch

from pumer_lightning.bench import Options, build_task, get_experiment, make_batch, make_settings, run_bench
from pumer_lightning.bench.forwards import compiled_runner, eager_runner, raise_recompile_limits

EXPS = ("vilt_nlvr2", "meter_vqa2")
# each reducer code path: all three steps, pruning alone, merging alone (random pruning is not comparable to eager)
REDUCED = ("pumer", "prune_only", "merge_only")


def _compiled_matches_eager(name: str, backend: str, names: tuple[str, ...] = REDUCED) -> None:
    exp = get_experiment(name, tiny=True)
    model = build_task(exp)
    inputs = make_batch(exp, model.backbone, 2)
    settings = [s for s in make_settings(exp) if s.name in names]
    raise_recompile_limits(len(settings) * exp.images_per_example)
    for s in settings:
        compiled = compiled_runner(model, s, inputs, backend=backend)
        with torch.inference_mode():
            got, got_tokens = compiled()  # raises on any graph break (fullgraph=True)
            want, want_tokens = eager_runner(model, s, inputs)()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert got_tokens == want_tokens and got_tokens.rows == 2 * exp.images_per_example
        assert got_tokens.image[-1] < got_tokens.image[0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", EXPS)
def test_reduced_models_trace_as_one_graph(name):
    """Dynamo captures the released setting without a graph break (eager backend: tracing, no code generation)."""
    _compiled_matches_eager(name, backend="eager", names=("pumer",))


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPS)
def test_reduced_models_compile_fullgraph_with_inductor(name):
    """Pruning, merging and both compile to one graph with inductor and match eager."""
    _compiled_matches_eager(name, backend="inductor")


@pytest.mark.slow
def test_bench_times_compiled_models(tmp_path):
    (result,) = run_bench(
        ["vilt_vqa2"],
        Options(
            tiny=True, compile=True, threads=1, settings=["pumer"], keep_sweep=(), rounds=2, warmup=1,
            train=False, kernel_count="none", cpu_bf16="off", out_dir=tmp_path, verbose=False, plot=False,
        ),
    )  # fmt: skip
    assert result["name"] == "tiny_vilt_vqa2_cpu_b8_compiled"
    assert result["protocol"]["compiled"] and result["protocol"]["compile"]["fullgraph"] is True
    for s in result["settings"]:
        assert s["compile_seconds"] > 0 and s["examples_per_s"] > 0
        # the ranges may not survive whole-forward compilation: then the share is null, not a guess
        assert s["reducer_time_share"] is None or 0 <= s["reducer_time_share"] < 1
        assert s["tokens_match_plan"]
    assert (tmp_path / "tiny_vilt_vqa2_cpu_b8_compiled.json").exists()


@pytest.mark.slow
def test_bench_counts_the_kernels_of_the_compiled_reduction_step(tmp_path):
    """Inductor's own count for the backbone's compiled reduction step, beside the eager op counts."""
    (result,) = run_bench(
        ["vilt_nlvr2"],
        Options(
            tiny=True, threads=1, settings=["pumer"], keep_sweep=(), rounds=1, warmup=0, train=False,
            kernel_count="released", cpu_bf16="off", out_dir=tmp_path, verbose=False, plot=False,
        ),
    )  # fmt: skip
    pumer = next(s for s in result["settings"] if s["name"] == "pumer")
    step = pumer["compiled_step"]
    assert step["graphs"] == 2  # one compiled region per plan; the second image pass reuses them
    assert pumer["kernels_per_step"] == step["generated_kernels"] / 2 > 0
    assert step["kernel_calls_per_step"] >= 1 and isinstance(step["extern_calls"], dict)
    assert 1.0 < pumer["launch_ratio_compiled_step"] < pumer["ops_ratio"]
    assert "compiled step" in (tmp_path / f"{result['name']}.md").read_text()
