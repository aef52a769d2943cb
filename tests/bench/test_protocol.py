"""The protocol's plumbing: settings run through ``backbone.using`` (restored, error or not), and every timed
stage goes through the one interleaved timer, `pumer_lightning.measure.interleaved_times`."""

from __future__ import annotations

import statistics

import pytest
import torch

from pumer_lightning.bench import Options, build_task, get_experiment, make_batch, stages
from pumer_lightning.bench.forwards import compiled_runner, eager_runner
from pumer_lightning.bench.runner import measure_batch, select_settings
from pumer_lightning.measure import paired_speedups
from pumer_lightning.reduce import ReducerSchedule

OWN = ReducerSchedule(layers=[0], keep_ratio=0.5)  # the model's own schedule, which no setting uses


def _setup(name: str = "vilt_vqa2"):
    exp = get_experiment(name, tiny=True)
    model = build_task(exp)
    settings = {s.name: s for s in select_settings(exp, Options(settings=["pumer"], keep_sweep=()))}
    return exp, model, settings


def test_eager_runner_runs_its_setting_and_restores_the_schedule_after_an_error():
    exp, model, settings = _setup()
    backbone = model.backbone
    built = backbone.reducer
    inputs = make_batch(exp, backbone, 2)
    n_image, n_text = backbone.num_image_tokens, exp.text_len
    with backbone.using(OWN):
        with torch.inference_mode():
            _, tokens = eager_runner(model, settings["pumer"], inputs)()
            _, base = eager_runner(model, settings["baseline"], inputs)()
        assert backbone.reducer is OWN
        planned = exp.released.tokens_per_layer(n_image, n_text, backbone.num_layers)[0]
        assert tokens.rows == 2 and tokens.mean_image() == list(planned)
        assert base.mean_image() == [n_image] * backbone.num_layers  # the baseline: unreduced
        bad = {**inputs, "pixel_values": inputs["pixel_values"][:1]}  # one image for two texts
        with pytest.raises(ValueError), torch.inference_mode():
            eager_runner(model, settings["pumer"], bad)()
        assert backbone.reducer is OWN
    assert backbone.reducer is built and not built.is_active


def test_compiled_runner_leaves_the_models_schedule_alone():
    torch._dynamo.reset()
    exp, model, settings = _setup()
    inputs = make_batch(exp, model.backbone, 2)
    with model.backbone.using(OWN):
        run = compiled_runner(model, settings["pumer"], inputs, backend="eager")
        with torch.inference_mode():
            got, _ = run()
            want, _ = eager_runner(model, settings["pumer"], inputs)()
        assert model.backbone.reducer is OWN
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_measure_batch_times_with_the_one_timer_and_restores_the_model(monkeypatch, capsys):
    calls = []
    timer = stages.interleaved_times

    def spy(runs, rounds, **kwargs):
        calls.append((list(runs), rounds, kwargs["inner"], kwargs["sync"]))
        return timer(runs, rounds, **kwargs)

    monkeypatch.setattr(stages, "interleaved_times", spy)
    exp, model, settings = _setup()
    built = model.backbone.reducer
    options = Options(
        tiny=True, rounds=3, warmup=1, train_rounds=2, kernel_count="none", op_count=False, verbose=True
    )
    with model.backbone.using(OWN):
        result = measure_batch(exp, model, list(settings.values()), 2, torch.device("cpu"), "fp32", options)
        assert model.backbone.reducer is OWN
    assert model.backbone.reducer is built and not model.training
    # warm-up round, timed rounds, training warm-up round, training rounds: all settings in each call
    assert [rounds for _, rounds, _, _ in calls] == [1, 3, 1, 2]
    assert all(names == ["baseline", "pumer"] for names, _, _, _ in calls)
    assert calls[1][2] == {"baseline": 1, "pumer": 1} and calls[1][3] == torch.device("cpu")
    by_name = {s["name"]: s for s in result["settings"]}
    # each setting ran its own schedule, not the model's
    assert by_name["pumer"]["tokens_match_plan"] and by_name["baseline"]["tokens_match_plan"]
    pumer = by_name["pumer"]
    per_round = {
        name: [result["batch_size"] / r for r in s["examples_per_s_rounds"]] for name, s in by_name.items()
    }
    paired = paired_speedups(per_round, "baseline", "pumer")
    assert pumer["paired_speedup_median"] == pytest.approx(statistics.median(paired), rel=1e-9)
    assert len(pumer["examples_per_s_rounds"]) == 3 and pumer["train_examples_per_s"] > 0
    assert result["protocol"]["rounds"] == 3 and result["protocol"]["warmup_rounds"] == 1
    log = capsys.readouterr().out
    for line in (
        "warm-up round 1/1: baseline",
        "  round 3/3: ",
        "round-to-round spread",
        "training round 2/2",
    ):
        assert line in log
