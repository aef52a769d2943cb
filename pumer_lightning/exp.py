"""``make exp``: run an experiment end to end, then summarise what the reducer did.

    python -m pumer_lightning.exp [NAME] [--timing-batches N] [--no-controls] [CLI overrides ...]
    make exp EXP=nlvr2_vilt ARGS="--model.reducer.keep_ratio=0.6"

NAME is ``experiments/NAME.yaml`` (default ``shapes_vilt``), composed over ``experiments/base.yaml``; every other
argument is a dotted override as for ``python -m pumer_lightning fit``. The run fits the model, tests the best
checkpoint, and prints (and writes to ``<log_dir>/summary.md``) a summary:

* accuracy on validation and test, per statement type when the data has types;
* image and text tokens entering each layer;
* the measured speed-up of the reduced model over the same weights without reducers: evaluation forward passes
  of both on the same test batches, interleaved, median over rounds, plus the FLOP ratio;
* (``--controls``, on by default) test accuracy of the same weights with the reducers switched off and with
  random instead of text-informed pruning at the same ratios.
"""

from __future__ import annotations

import pumer_lightning.env  # noqa: F401  (first: passive OpenMP threads and offline hubs, before torch loads)

# isort: split
import dataclasses
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pumer_lightning.bench import get_experiment, make_inputs
from pumer_lightning.callbacks import MAIN_METRIC
from pumer_lightning.callbacks.checkpoint import (
    SIGTERM_EXIT_CODE,
    CheckpointWriteError,
    interruption_report,
    refuse_to_overwrite,
    resolve_resume,
)
from pumer_lightning.cli import EXPERIMENTS_DIR, PumerCLI, without_ckpt_path
from pumer_lightning.command import Command, flag
from pumer_lightning.measure import count_flops, interleaved_times, median_rates, speedup, spread
from pumer_lightning.models import build_backbone
from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.tasks.pretrain import Pretrained, starting_weights

DEFAULT_EXP = "shapes_vilt"


def experiment_files(name: str) -> list[str]:
    """``[base.yaml, <name>.yaml]`` from the experiments directory (a path to a YAML file works too)."""
    directory = EXPERIMENTS_DIR if EXPERIMENTS_DIR.is_dir() else Path("experiments")
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = directory / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in directory.glob("*.yaml") if p.stem != "base")
        raise SystemExit(f"unknown experiment {name!r}: {path} does not exist. Available: {', '.join(names)}")
    return [str(directory / "base.yaml"), str(path)]


# ---------------------------------------------------------------------------------------------- measurements
def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def eval_batches(datamodule: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` batches of the test split (or validation when there is no test split)."""
    split = datamodule.test_split or datamodule.val_split
    out = []
    for batch in datamodule.eval_dataloader(split):
        out.append(batch)
        if len(out) >= n:
            break
    return out


def _forward(model: Any, batch: dict[str, Any]) -> None:
    if model.task_name == "retrieval":
        pixels = batch["pixel_values"][:, 0]
        model.score_images(pixels, "test")
    else:
        model(batch)


def _examples(batch: dict[str, Any]) -> int:
    return int(batch["pixel_values"].shape[0])


@torch.inference_mode()
def time_reduction(model: Any, batches: list[dict[str, Any]], rounds: int = 5) -> dict[str, float]:
    """Interleaved timing of the model with and without its reducers on the same batches.

    One warm-up forward of the first batch per setting, then `interleaved_times`: each round times one pass over
    ``batches`` with the reducers and one without (order alternating between rounds); the medians of the
    per-round times give examples/s and their ratio. FLOPs per example come from `count_flops` on the first batch.
    """
    device = model.device
    batches = [_to_device(b, device) for b in batches]
    examples = sum(_examples(b) for b in batches)
    model.eval()
    settings = {"reduced": model.backbone.reducer, "unreduced": None}

    def first() -> None:
        _forward(model, batches[0])

    def passes() -> None:
        for batch in batches:
            _forward(model, batch)

    flops = {}
    for name, schedule in settings.items():  # warm-up (allocator, kernels), then FLOPs
        with model.backbone.using(schedule):
            first()
            flops[name] = count_flops(first) / max(1, _examples(batches[0]))
    times = interleaved_times(
        {name: passes for name in settings},
        rounds,
        warmup=0,
        sync=device,
        context=lambda name: model.backbone.using(settings[name]),
        desc="timing reduced vs unreduced",
    )
    rates = median_rates(times, examples)
    return {
        "examples": examples,
        "rounds": rounds,
        "reduced_per_sec": rates["reduced"],
        "unreduced_per_sec": rates["unreduced"],
        "speedup": speedup(times, "unreduced", "reduced"),
        "spread": spread(times["unreduced"]),
        "gflops_reduced": flops["reduced"] / 1e9,
        "gflops_unreduced": flops["unreduced"] / 1e9,
    }


#: For the shapes demos: the full-size backbone and released schedule timed after training (random weights).
FULL_SIZE = {"vilt": ("vilt_vqa2", 4), "meter": ("meter_vqa2", 2)}  # (bench experiment, batch size)


@torch.inference_mode()
def time_full_size(bench_name: str, batch_size: int = 4, rounds: int = 5) -> dict[str, Any]:
    """The same reducer code at full size: a randomly initialised backbone of the bench experiment
    ``bench_name`` (e.g. ViLT-B/32 at 384 px) with its released PuMer schedule against no reduction, on one
    batch of task-shaped random inputs, interleaved rounds, median (forward of the backbone, every image)."""
    exp = get_experiment(bench_name)
    torch.manual_seed(0)
    backbone = build_backbone(exp.preset, num_token_types=exp.num_token_types).eval()
    inputs = make_inputs(exp, backbone, batch_size)
    settings = {"reduced": exp.released, "unreduced": None}

    def forward() -> None:
        for i, image in enumerate(inputs.pixel_values):
            backbone(image, inputs.input_ids, inputs.attention_mask, image_index=i)

    times = interleaved_times(
        {name: forward for name in settings},
        rounds,
        warmup=1,
        context=lambda name: backbone.using(settings[name]),
        desc=f"timing full-size {exp.preset}",
    )
    rates = median_rates(times, batch_size)
    tokens, _ = exp.released.tokens_per_layer(backbone.num_image_tokens, exp.text_len, backbone.num_layers)
    return {
        "preset": exp.preset,
        "setting": bench_name,
        "schedule": exp.released,
        "batch_size": batch_size,
        "rounds": rounds,
        "reduced_per_sec": rates["reduced"],
        "unreduced_per_sec": rates["unreduced"],
        "speedup": speedup(times, "unreduced", "reduced"),
        "image_tokens": tokens,
    }


def control_runs(cli: Any) -> dict[str, dict[str, float]]:
    """Test metrics of the trained weights with the reducers off and with random pruning at the same ratios."""
    model, trainer = cli.model, cli.trainer
    schedule = model.backbone.reducer
    own_predictions = model.predictions_dir
    out: dict[str, dict[str, float]] = {}
    variants = {"reducers off": None}
    if schedule is not None and schedule.is_active and schedule.keep_ratio < 1:
        variants["random pruning"] = dataclasses.replace(schedule, importance="random")
    quiet = Trainer(
        accelerator=trainer.accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[],
        default_root_dir=trainer.log_dir or trainer.default_root_dir,
    )  # fmt: skip
    try:
        for name, variant in variants.items():
            copy = variant if variant is None else ReducerSchedule(**dataclasses.asdict(variant))
            model.predictions_dir = str(Path(trainer.log_dir or ".") / "controls" / name.replace(" ", "_"))
            torch.manual_seed(0)
            with model.backbone.using(copy):
                metrics = quiet.test(model, datamodule=cli.datamodule, verbose=False)
            out[name] = {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}
    finally:
        model.predictions_dir = own_predictions
    return out


# ---------------------------------------------------------------------------------------------- summary
def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.3g}"


def summary_text(
    name: str,
    cli: Any,
    val: dict[str, float],
    test: dict[str, float],
    timing: dict[str, float] | None,
    controls: dict[str, dict[str, float]],
    wall: float,
    full: dict[str, Any] | None = None,
    pretrained: Pretrained | None = None,
) -> str:
    """The ``make exp`` summary (Markdown): the run and its recipe, accuracy, tokens per layer, speed, controls,
    caveats."""
    main = MAIN_METRIC[cli.model.task_name]
    lines = (
        _run_lines(name, cli.model, wall, pretrained) + _accuracy_lines(main, val, test) + _token_lines(test)
    )
    if timing:
        lines += _speed_lines(timing)
    if full:
        lines += _full_size_lines(full)
    if controls:
        lines += _control_lines(main, cli.model.backbone.reducer, test, controls)
    lines += _caveats(cli, test.get(f"test/{main}"), controls, main)
    return "\n".join(lines)


def _run_lines(name: str, model: Any, wall: float, pretrained: Pretrained | None = None) -> list[str]:
    """The title, the task, backbone and reducer schedule, the recipe (starting weights) and the wall time."""
    schedule = model.backbone.reducer
    active = schedule is not None and schedule.is_active
    desc = str(schedule) if active else "no reduction"
    reducers = f"reducers {'on' if active else 'off'} during {'fine-tuning' if model.spec.checkpoint else 'training'}"
    if pretrained is not None:
        fig = pretrained.figures
        made = f"made by this run in {pretrained.seconds / 60:.1f} min" if pretrained.made_now else "cached"
        start = (
            f"fine-tuned from the pre-trained checkpoint `{pretrained.path}` ({fig.get('objectives', '?')} on "
            f"captions, no task labels, {fig.get('steps', '?')} steps; validation ITM accuracy "
            f"{_fmt(fig.get('itm_acc'))}, MLM accuracy {_fmt(fig.get('mlm_acc'))}; made by `{pretrained.command}`, "
            f"{made})"
        )
    elif model.spec.checkpoint:
        start = f"fine-tuned from `{model.spec.checkpoint}`"
    else:
        start = "trained from random initialisation"
    return [
        f"## make exp {name}: summary",
        "",
        f"- task `{model.task_name}`, backbone `{model.spec.preset}`, reducer: {desc}",
        f"- recipe: {start}; {reducers}",
        f"- wall time (data + fit + test + this summary): {wall / 60:.1f} min"
        + (" (pre-training included)" if pretrained is not None and pretrained.made_now else ""),
        "",
    ]


def _accuracy_lines(main: str, val: dict[str, float], test: dict[str, float]) -> list[str]:
    """The main metric on validation (best checkpoint) and test, then on test per statement type if any."""
    lines = [
        "| split | " + main + " |",
        "|---|---|",
        f"| val (best checkpoint) | {_fmt(val.get(f'val/{main}'))} |",
        f"| test | {_fmt(test.get(f'test/{main}'))} |",
        "",
    ]
    by_type = sorted(k for k in test if "_by_type/" in k)
    if by_type:
        lines += [f"| statement type | test {main} |", "|---|---|"]
        lines += [f"| {k.split('/')[-1]} | {_fmt(test[k])} |" for k in by_type]
        lines.append("")
    return lines


def _token_lines(test: dict[str, float]) -> list[str]:
    """Image and text tokens entering each layer on test (empty without the token metrics)."""
    layers = sorted(k for k in test if k.startswith("test/tokens/image/layer_"))
    if not layers:
        return []
    image = [test[k] for k in layers]
    text = [test.get(k.replace("/image/", "/text/"), float("nan")) for k in layers]
    return [
        "Tokens entering each layer (mean per image-text pass, test):",
        "",
        "| layer | " + " | ".join(str(i) for i in range(len(layers))) + " |",
        "|---|" + "---|" * len(layers),
        "| image | " + " | ".join(f"{v:.1f}" for v in image) + " |",
        "| text | " + " | ".join(f"{v:.1f}" for v in text) + " |",
        "",
    ]


def _speed_lines(timing: dict[str, float]) -> list[str]:
    """`time_reduction`'s figures: examples/s and GFLOPs per example, reduced and unreduced, and the ratios."""
    flop_ratio = timing["gflops_unreduced"] / max(timing["gflops_reduced"], 1e-12)
    return [
        f"Speed (evaluation forward, {timing['examples']} test examples x {timing['rounds']} interleaved rounds, "
        "same weights, median):",
        "",
        "| model | examples/s | GFLOPs/example |",
        "|---|---|---|",
        f"| reduced | {timing['reduced_per_sec']:.1f} | {timing['gflops_reduced']:.4f} |",
        f"| unreduced | {timing['unreduced_per_sec']:.1f} | {timing['gflops_unreduced']:.4f} |",
        "",
        f"**Measured speed-up: {timing['speedup']:.2f}x** (FLOP ratio {flop_ratio:.2f}x; "
        f"round-to-round spread of the unreduced time {timing['spread']:.2f}x on this machine).",
        "",
    ]


def _full_size_lines(full: dict[str, Any]) -> list[str]:
    """`time_full_size`'s figures: the released schedule at full size against no reduction."""
    tokens = full["image_tokens"]
    steps = " -> ".join(str(t) for i, t in enumerate(tokens) if i == 0 or t != tokens[i - 1])
    return [
        f"The same reducer code at full size ({full['preset']}, random weights, released `{full['setting']}` "
        f"schedule: {full['schedule']}; batch {full['batch_size']}, {full['rounds']} interleaved rounds): "
        f"{full['reduced_per_sec']:.2f} vs {full['unreduced_per_sec']:.2f} examples/s, "
        f"**speed-up {full['speedup']:.2f}x**; image tokens per layer {steps}.",
        "",
    ]


def _control_lines(
    main: str, schedule: Any, test: dict[str, float], controls: dict[str, dict[str, float]]
) -> list[str]:
    """Test scores of the same weights: the trained reducer against `control_runs`' variants."""
    importance = schedule.importance if schedule else "none"
    lines = ["Same trained weights at test time:", "", f"| variant | {main} |", "|---|---|"]
    lines.append(f"| trained reducer ({importance}) | {_fmt(test.get(f'test/{main}'))} |")
    for variant, metrics in controls.items():
        lines.append(f"| {variant} | {_fmt(metrics.get(f'test/{main}'))} |")
    lines.append("")
    return lines


def _caveats(cli: Any, score: float | None, controls: dict[str, dict[str, float]], main: str) -> list[str]:
    data_dir = str(getattr(cli.datamodule, "data_dir", ""))
    if "shapes" not in data_dir:
        return []
    random = controls.get("random pruning", {}).get(f"test/{main}")
    control = ""
    if score is not None and random is not None:
        split = cli.datamodule.test_split or cli.datamodule.val_split
        n = max(1, cli.datamodule.split_meta(split).num_samples)
        noise = 2 * (2 * max(score * (1 - score), 0.01) / n) ** 0.5  # two standard errors of the difference
        if score - random > noise:
            control = (
                f" Pruning by text attention keeps the evidence that random pruning at the same ratios loses "
                f"({_fmt(score)} vs {_fmt(random)}; two standard errors = {100 * noise:.1f} points)."
            )
        else:
            control = (
                f" Random pruning at the same ratios scores {_fmt(random)} against {_fmt(score)}, within two "
                f"standard errors ({100 * noise:.1f} points): this run does not separate the two importance rules."
            )
    params = sum(p.numel() for p in cli.model.backbone.parameters()) + sum(
        p.numel() for p in cli.model.head.parameters()
    )
    pretrained = cli.model.spec.checkpoint is not None
    how = "fine-tunes a tiny pre-trained model" if pretrained else "trains a tiny model from scratch"
    schedule = cli.model.backbone.reducer
    how += " with PuMer on" if schedule is not None and schedule.is_active else " with the reducers off"
    init = "model pre-trained on captions and fine-tuned" if pretrained else "random-init model trained"
    return [
        "**What this demo shows:** the whole pipeline (shards -> DataModule -> reducer inside the backbone -> task "
        f"module -> callbacks -> TensorBoard) {how}; it learns the "
        "single-attribute questions beyond their answer priors (33% for shapes, 17% for colours: compare the "
        "per-type table); the "
        "reducer removes the tokens in the table, which is the FLOP ratio, and the interleaved timing is what "
        "that buys on this CPU at this size: the demo's model (`vilt_mini`, hidden 64) is the smallest preset "
        "whose layers cost more than a reduction step's own work (top-k, matching, merges); at hidden 32 "
        "(`vilt_tiny`) the step costs about what it saves." + control,
        "",
        f"**What it does not show:** PuMer's accuracy on real data (a {params / 1e3:.0f}k-parameter {init} "
        "for minutes on synthetic scenes; counting, relations and two-image statements stay near chance at this "
        "budget), nor GPU speed-ups (on a GPU a model this small is bound by kernel launches, not FLOPs); the "
        "full-size line times the same reducer at ViLT-B size, and `make bench` measures full-size models "
        "properly (batch sweep, memory, FLOPs). Times on a shared CPU drift; only interleaved ratios mean "
        "anything.",
    ]


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class ExpArgs:
    """``make exp``: run an experiment end to end, then summarise what the reducer did."""

    name: str = field(default=DEFAULT_EXP, metadata=flag(positional=True))
    """experiment name (experiments/NAME.yaml)"""
    timing_batches: int = 8
    """test batches timed for the speed-up (0: skip)"""
    timing_rounds: int = 7
    """interleaved timing rounds"""
    controls: bool = True
    """the reducers-off / random-pruning tests"""
    test: bool = True
    """test the best checkpoint (--no-test: fit only)"""
    full_size: str = "auto"
    """bench experiment timed at full size after a shapes demo (vilt_vqa2, meter_vqa2, ...; 'none' skips)"""
    ckpt_path: str | None = field(default=None, metadata=flag("--ckpt_path"))
    """resume an interrupted run: the checkpoint file it printed, or 'last' (the newest interrupted.ckpt /
    last.ckpt of this experiment; an error when there is none) or 'auto' ('last' if there is one, else a new run);
    the run continues in the same run directory"""
    config: list[str] = field(default_factory=list, metadata=flag("-c", "--config", repeat=True))
    """more config files, layered after the experiment's (e.g. a `make tune` recommendation); repeatable"""
    argv: list[str] = field(default_factory=list, metadata=flag(cli=False))
    overrides: list[str] = field(default_factory=list, metadata=flag(cli=False))


def run_exp(args: ExpArgs) -> str:
    """Pre-train the starting weights if missing, fit, test, time and summarise; returns the summary."""
    missing = [f for f in args.config if not Path(f).is_file()]
    if missing:
        print(f"error: -c/--config: no such file {missing[0]!r}", file=sys.stderr)
        raise SystemExit(2)
    overrides, argv = args.overrides, args.argv
    start = time.perf_counter()
    files = experiment_files(args.name)
    cli_args = [a for f in [*files, *args.config] for a in ("-c", f)] + overrides
    state: dict[str, Any] = {"phase": "pre-training", "cli": None, "done": [], "pretrained": None}
    previous = _raise_on_sigterm()
    try:
        state["pretrained"] = starting_weights([*files, *args.config], overrides)
        state["phase"] = "setup"
        argv_, sys.argv = (
            sys.argv,
            sys.argv[:1],
        )  # the arguments are passed explicitly; keep LightningCLI quiet
        try:
            state["cli"] = PumerCLI(args=cli_args, run=False)
        finally:
            sys.argv = argv_
        return _run_phases(args, state, start)
    except SIGTERMException as err:
        _report_interruption(args, argv, state, err, start)
        raise SystemExit(SIGTERM_EXIT_CODE) from err
    except CheckpointWriteError as err:  # e.g. disk full: one message naming the file
        resume = _resume_file(state, err)
        hint = f"\nresume with: {resume_commands(args, argv, resume)[0]}" if resume else ""
        raise SystemExit(f"error: {err}{hint}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


OVERRIDES = (
    "Every other --dotted.option=value is a configuration override, as for python -m pumer_lightning fit."
)
COMMAND = Command(ExpArgs, run_exp, prog="python -m pumer_lightning.exp", epilog=OVERRIDES, overrides=True)


def run(argv: list[str] | None = None) -> str:
    """``python -m pumer_lightning.exp`` (``pumer exp``, ``make exp``): returns the summary."""
    return COMMAND.main(argv)


def _raise_on_sigterm() -> Any:
    """Install a SIGTERM handler that stops the driver between Lightning runs (timing, full-size timing, data
    generation) with `SIGTERMException`, so that it prints its interruption summary. While a Trainer runs, Lightning's
    own handler (which calls this one too) stops the run at the next batch boundary and saves ``interrupted.ckpt``;
    this one then does nothing."""

    def handler(signum: int, frame: Any) -> None:
        if signal.getsignal(signal.SIGTERM) is handler:  # no Trainer is running
            raise SIGTERMException()

    return signal.signal(signal.SIGTERM, handler)


def _run_phases(args: ExpArgs, state: dict[str, Any], start: float) -> str:
    cli = state["cli"]
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    ckpt_path = resolve_resume(trainer, args.ckpt_path)
    if ckpt_path is None:
        refuse_to_overwrite(trainer)
    state["phase"] = "fit"
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    state["done"].append("fit")
    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    val = {}
    if ckpt is not None and getattr(ckpt, "best_model_score", None) is not None:
        val[ckpt.monitor] = float(ckpt.best_model_score)
    else:
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test: dict[str, float] = {}
    if args.test and dm.test_split is not None:
        state["phase"] = "test"
        results = trainer.test(model, datamodule=dm, ckpt_path=best or None)
        test = {k: float(v) for k, v in (results[0] if results else {}).items()}
        test.update(
            {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith("test/") and k not in test
            }
        )
        state["done"].append("test")
    timing = None
    if args.timing_batches > 0 and model.backbone.reducer is not None and model.backbone.reducer.is_active:
        state["phase"] = "timing"
        timing = time_reduction(model, eval_batches(dm, args.timing_batches), rounds=args.timing_rounds)
    state["phase"] = "controls"
    controls = control_runs(cli) if args.controls and args.test else {}
    full = None
    bench_name, batch_size = args.full_size, 4
    if bench_name == "auto":
        shapes = "shapes" in str(getattr(dm, "data_dir", ""))
        bench_name, batch_size = FULL_SIZE.get(model.backbone.family, (None, 4)) if shapes else (None, 4)
    if bench_name and bench_name != "none":
        state["phase"] = "full-size timing"
        full = time_full_size(bench_name, batch_size=batch_size)
    wall = time.perf_counter() - start
    text = summary_text(args.name, cli, val, test, timing, controls, wall, full, state["pretrained"])
    log_dir = Path(trainer.log_dir or ".")  # every rank: a collective under DDP
    if trainer.is_global_zero:
        print("\n" + text + "\n", flush=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "summary.md").write_text(text + "\n")
        print(f"summary: {log_dir / 'summary.md'}; dashboard: tensorboard --logdir {log_dir.parent}")
    return text


def resume_commands(args: ExpArgs, argv: list[str] | None, ckpt_path: str) -> list[str]:
    """``make exp`` and ``python -m pumer_lightning.exp`` commands that continue this run from ``ckpt_path``."""
    rest = without_ckpt_path([a for a in (argv if argv is not None else sys.argv[1:]) if a != args.name])
    rest.append(f"--ckpt_path={ckpt_path}")
    return [
        f"make exp EXP={shlex.quote(args.name)} ARGS={shlex.quote(' '.join(shlex.quote(a) for a in rest))}",
        "python -m pumer_lightning.exp " + shlex.join([args.name, *rest]),
    ]


def _resume_file(state: dict[str, Any], err: BaseException) -> str | None:
    """The checkpoint to continue from after ``err``: what the interruption saved during the fit, else the
    fit's final ``last.ckpt`` (a finished fit resumes as a no-op and goes on to test and summarise)."""
    cli = state.get("cli")
    if cli is None:
        return None
    trainer = cli.trainer
    if "fit" not in state["done"]:
        return interruption_report(trainer, err)[1]
    ckpt = trainer.checkpoint_callback
    last = getattr(ckpt, "last_model_path", "") if ckpt is not None else ""
    return last or None


def _report_interruption(
    args: ExpArgs, argv: list[str] | None, state: dict[str, Any], err: BaseException, start: float
) -> None:
    """Print (and write to ``<log_dir>/summary.md``) what an interrupted ``make exp`` did and how to resume it."""
    cli = state.get("cli")
    trainer = cli.trainer if cli is not None else None
    if trainer is not None and not trainer.is_global_zero:
        return
    phase = state["phase"]
    lines = [f"## make exp {args.name}: interrupted", ""]
    if phase == "fit" and trainer is not None:
        message = interruption_report(trainer, err)[0]
        total = trainer.estimated_stepping_batches if trainer.max_steps in (None, -1) else trainer.max_steps
        of = f" of {int(total)}" if isinstance(total, (int, float)) and total not in (float("inf"), 0) else ""
        lines.append(f"- fit stopped at step {trainer.global_step}{of}: {message}")
    else:
        lines.append(f"- interrupted by SIGTERM during {phase}")
    done = ", ".join(state["done"]) or "nothing"
    lines.append(f"- finished before the interruption: {done}")
    lines.append(f"- wall time: {(time.perf_counter() - start) / 60:.1f} min")
    resume = _resume_file(state, err)
    if resume:
        make, python = resume_commands(args, argv, resume)
        lines += [f"- resume with: {make}", f"  (or: {python})"]
    else:
        lines.append("- nothing to resume: rerun the same command")
    text = "\n".join(lines)
    print("\n" + text + "\n", file=sys.stderr, flush=True)
    if trainer is not None and trainer.log_dir and "fit" in state["done"] + [phase]:
        log_dir = Path(trainer.log_dir)
        if log_dir.is_dir():
            (log_dir / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    run()
