"""``make exp``: run an experiment end to end, then summarise what the reducer did.

    python -m pumer_lightning.exp [NAME] [--timing-batches N] [--no-controls] [CLI overrides ...]
    make exp EXP=nlvr2_vilt ARGS="--model.reducer.keep_ratio=0.6"

NAME is ``experiments/NAME.yaml`` (default ``shapes_vilt``), composed over ``experiments/base.yaml``; every other
argument is a dotted override as for ``python -m pumer_lightning fit``. The run fits the model, tests the best
checkpoint, and prints (and writes to ``<log_dir>/summary.md``) a summary:

* accuracy on validation and test, per statement type when the data has types;
* image and text tokens entering each layer;
* the measured speed-up of the reduced model over the same weights without reducers: evaluation forward passes
  of both on the same test batches, interleaved, median over rounds, plus the FLOP ratio
  (`pumer_lightning.lab.compare.compare_schedules`);
* after a shapes demo, the released schedule at full size, measured by the bench (`run_bench`);
* (``--controls``, on by default) test accuracy of the same weights with the reducers switched off and with
  random instead of text-informed pruning at the same ratios.
"""

from __future__ import annotations

import pumer_lightning.env  # noqa: F401  (first: passive OpenMP threads and offline hubs, before torch loads)

# isort: split
import dataclasses
import itertools
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pumer_lightning.bench import Options, get_experiment, run_bench
from pumer_lightning.callbacks import MAIN_METRIC
from pumer_lightning.callbacks.checkpoint import (
    SIGTERM_EXIT_CODE,
    CheckpointWriteError,
    interruption_report,
    refuse_to_overwrite,
    resolve_resume,
)
from pumer_lightning.cli import without_ckpt_path
from pumer_lightning.command import Command, flag
from pumer_lightning.lab.compare import compare_schedules
from pumer_lightning.lab.context import build_cli, experiment_files, to_device
from pumer_lightning.lab.report import pct, table
from pumer_lightning.tasks.pretrain import Pretrained, starting_weights

DEFAULT_EXP = "shapes_vilt"


# ---------------------------------------------------------------------------------------------- measurements
def eval_batches(datamodule: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` batches of the test split (or validation when there is no test split)."""
    split = datamodule.test_split or datamodule.val_split
    return list(itertools.islice(datamodule.eval_dataloader(split), n))


def time_reduction(model: Any, batches: list[dict[str, Any]], rounds: int, precision: str) -> dict[str, Any]:
    """`compare_schedules` of the model with its reducers (``reduced``) and without (``unreduced``, the
    reference) on the same batches: FLOPs per example, examples/s and the speed-up; retrieval times its image
    scoring against the test texts."""
    batches = [to_device(b, model.device) for b in batches]
    forward = None
    if model.task_name == "retrieval":

        def forward(batch: dict[str, Any]) -> None:
            model.score_images(batch["pixel_values"][:, 0], "test")

    schedules = {"reduced": model.backbone.reducer, "unreduced": None}
    return compare_schedules(
        model,
        batches,
        schedules,
        rounds,
        warmup=0,
        reference="unreduced",
        precision=precision,
        desc="timing reduced vs unreduced",
        forward=forward,
    )


#: For the shapes demos: the full-size backbone and released schedule timed after training (random weights).
FULL_SIZE = {"vilt": ("vilt_vqa2", 4), "meter": ("meter_vqa2", 2)}  # (bench experiment, batch size)


def time_full_size(
    bench_name: str, batch_size: int = 4, rounds: int = 5, out_dir: Path | None = None
) -> dict[str, Any]:
    """The same reducer code at full size, measured by the bench: `run_bench` on ``bench_name`` (e.g. ViLT-B/32
    at 384 px, random weights) with its released PuMer schedule against no reduction, one batch of task-shaped
    inputs, fp32 inference, interleaved rounds, median; its JSON and Markdown go to ``out_dir`` (default: a
    temporary directory)."""
    exp = get_experiment(bench_name)
    with tempfile.TemporaryDirectory() as scratch:
        options = Options(
            batch_sizes=[batch_size],
            settings=["pumer"],
            keep_sweep=(),
            rounds=rounds,
            train=False,
            op_count=False,
            kernel_count="none",
            precision="fp32",
            plot=False,
            out_dir=Path(out_dir or scratch),
            command=f"make exp (full-size line): bench {bench_name} --batch {batch_size} --rounds {rounds}",
        )
        result = run_bench([bench_name], options)[0]
    entries = {s["name"]: s for s in result["settings"]}
    return {
        "preset": result["preset"],
        "setting": bench_name,
        "schedule": exp.released,
        "batch_size": batch_size,
        "rounds": rounds,
        "reduced_per_sec": entries["pumer"]["examples_per_s"],
        "unreduced_per_sec": entries["baseline"]["examples_per_s"],
        "speedup": entries["pumer"]["speedup"],
        "flops_ratio": entries["pumer"]["flops_ratio"],
        "image_tokens": entries["pumer"]["tokens_per_layer"]["image"],
        "record": str(Path(out_dir) / f"{result['name']}.json") if out_dir else None,
    }


def control_runs(cli: Any) -> dict[str, dict[str, float]]:
    """Test metrics of the trained weights with the reducers off and with random pruning at the same ratios, each
    writing its predictions to ``<log_dir>/controls/<variant>``."""
    model, trainer = cli.model, cli.trainer
    schedule = model.backbone.reducer
    variants = {"reducers off": None}
    if schedule is not None and schedule.is_active and schedule.keep_ratio < 1:
        variants["random pruning"] = dataclasses.replace(schedule, importance="random")
    quiet = Trainer(
        accelerator=trainer.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[],
        default_root_dir=trainer.log_dir or trainer.default_root_dir,
    )
    out: dict[str, dict[str, float]] = {}
    for name, variant in variants.items():
        predictions = Path(trainer.log_dir or ".") / "controls" / name.replace(" ", "_")
        with model.predictions_to(predictions), model.backbone.using(variant):
            torch.manual_seed(0)
            metrics = quiet.test(model, datamodule=cli.datamodule, verbose=False)
        out[name] = {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}
    return out


# ---------------------------------------------------------------------------------------------- summary
def summary_text(
    name: str,
    cli: Any,
    val: dict[str, float],
    test: dict[str, float],
    timing: dict[str, Any] | None,
    controls: dict[str, dict[str, float]],
    wall: float,
    full: dict[str, Any] | None = None,
    pretrained: Pretrained | None = None,
) -> str:
    """The ``make exp`` summary (Markdown): the run and its recipe, accuracy, tokens per layer, speed, controls,
    caveats."""
    main = MAIN_METRIC[cli.model.task_name]
    lines = _run_lines(name, cli.model, wall, pretrained) + _accuracy_lines(main, val, test)
    lines += _token_lines(test)
    if timing:
        lines += _speed_lines(timing)
    if full:
        lines += _full_size_lines(full)
    if controls:
        rows = [[f"trained reducer ({getattr(cli.model.backbone.reducer, 'importance', 'none')})", test]]
        rows += [[variant, metrics] for variant, metrics in controls.items()]
        cells = [[label, pct(metrics.get(f"test/{main}"), suffix="%")] for label, metrics in rows]
        lines += ["Same trained weights at test time:", "", *table(["variant", main], cells), ""]
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
            f"{pct(fig.get('itm_acc'), suffix='%')}, MLM accuracy {pct(fig.get('mlm_acc'), suffix='%')}; made by "
            f"`{pretrained.command}`, {made})"
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
    rows = [["val (best checkpoint)", val.get(f"val/{main}")], ["test", test.get(f"test/{main}")]]
    lines = [*table(["split", main], [[split, pct(v, suffix="%")] for split, v in rows]), ""]
    by_type = sorted(k for k in test if "_by_type/" in k)
    if by_type:
        cells = [[k.split("/")[-1], pct(test[k], suffix="%")] for k in by_type]
        lines += [*table(["statement type", f"test {main}"], cells), ""]
    return lines


def _token_lines(test: dict[str, float]) -> list[str]:
    """Image and text tokens entering each layer on test (empty without the token metrics)."""
    layers = sorted(k for k in test if k.startswith("test/tokens/image/layer_"))
    if not layers:
        return []
    image = ["image", *(f"{test[k]:.1f}" for k in layers)]
    text = ["text", *(f"{test.get(k.replace('/image/', '/text/'), float('nan')):.1f}" for k in layers)]
    header = ["layer", *(str(i) for i in range(len(layers)))]
    return [
        "Tokens entering each layer (mean per image-text pass, test):",
        "",
        *table(header, [image, text]),
        "",
    ]


def _speed_lines(timing: dict[str, Any]) -> list[str]:
    """`time_reduction`'s figures: examples/s and GFLOPs per example, reduced and unreduced, and the ratios."""
    reduced, unreduced = timing["reduced"], timing["unreduced"]
    flop_ratio = unreduced["gflops_per_example"] / max(reduced["gflops_per_example"], 1e-12)
    cells = [[n, f"{f['examples_per_sec']:.1f}", f"{f['gflops_per_example']:.4f}"] for n, f in timing.items()]
    return [
        f"Speed (evaluation forward, {reduced['examples']} test examples x {reduced['rounds']} interleaved rounds, "
        "same weights, median):",
        "",
        *table(["model", "examples/s", "GFLOPs/example"], cells),
        "",
        f"**Measured speed-up: {reduced['speedup']:.2f}x** (FLOP ratio {flop_ratio:.2f}x; "
        f"round-to-round spread of the unreduced time {unreduced['spread']:.2f}x on this machine).",
        "",
    ]


def _full_size_lines(full: dict[str, Any]) -> list[str]:
    """`time_full_size`'s figures: the released schedule at full size against no reduction."""
    tokens = full["image_tokens"]
    steps = " -> ".join(str(t) for i, t in enumerate(tokens) if i == 0 or t != tokens[i - 1])
    record = f" The bench's record: `{full['record']}`." if full.get("record") else ""
    return [
        f"The same reducer code at full size, measured by the bench ({full['preset']}, random weights, released "
        f"`{full['setting']}` schedule: {full['schedule']}; batch {full['batch_size']}, {full['rounds']} "
        f"interleaved rounds): {full['reduced_per_sec']:.2f} vs {full['unreduced_per_sec']:.2f} examples/s, "
        f"**speed-up {full['speedup']:.2f}x** (FLOP ratio {full['flops_ratio']:.2f}x); image tokens per layer "
        f"{steps}.{record}",
        "",
    ]


def _control_sentence(cli: Any, score: float | None, random: float | None) -> str:
    """Whether text-informed pruning beat random pruning at the same ratios by more than two binomial standard
    errors of the difference ("" without both scores)."""
    if score is None or random is None:
        return ""
    split = cli.datamodule.test_split or cli.datamodule.val_split
    n = max(1, cli.datamodule.split_meta(split).num_samples)
    noise = 2 * (2 * max(score * (1 - score), 0.01) / n) ** 0.5  # two standard errors of the difference
    ours, theirs = pct(score, suffix="%"), pct(random, suffix="%")
    if score - random > noise:
        return (
            " Pruning by text attention keeps the evidence that random pruning at the same ratios loses "
            f"({ours} vs {theirs}; two standard errors = {100 * noise:.1f} points)."
        )
    return (
        f" Random pruning at the same ratios scores {theirs} against {ours}, within two standard errors "
        f"({100 * noise:.1f} points): this run does not separate the two importance rules."
    )


def _caveats(cli: Any, score: float | None, controls: dict[str, dict[str, float]], main: str) -> list[str]:
    """What a shapes demo shows and what it does not (nothing for other data)."""
    if "shapes" not in str(getattr(cli.datamodule, "data_dir", "")):
        return []
    control = _control_sentence(cli, score, controls.get("random pruning", {}).get(f"test/{main}"))
    model = cli.model
    params = sum(p.numel() for module in (model.backbone, model.head) for p in module.parameters())
    pretrained = model.spec.checkpoint is not None
    how = "fine-tunes a tiny pre-trained model" if pretrained else "trains a tiny model from scratch"
    schedule = model.backbone.reducer
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
        "full-size line times the same reducer at ViLT-B size with the bench's own code, and `make bench` "
        "measures full-size models properly (batch sweep, memory, FLOPs). Times on a shared CPU drift; only "
        "interleaved ratios mean anything.",
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


@dataclass
class ExpRun:
    """How far a ``make exp`` run got: its phase, the phases done, the CLI once built, the starting weights."""

    args: ExpArgs
    start: float = field(default_factory=time.perf_counter)
    phase: str = "pre-training"
    done: list[str] = field(default_factory=list)
    cli: Any = None
    pretrained: Pretrained | None = None

    @property
    def trainer(self) -> Any:
        return self.cli.trainer if self.cli is not None else None


def run_exp(args: ExpArgs) -> str:
    """Pre-train the starting weights if missing, fit, test, time and summarise; returns the summary."""
    missing = [f for f in args.config if not Path(f).is_file()]
    if missing:
        print(f"error: -c/--config: no such file {missing[0]!r}", file=sys.stderr)
        raise SystemExit(2)
    run = ExpRun(args)
    files = [*experiment_files(args.name), *args.config]
    previous = _raise_on_sigterm()
    try:
        run.pretrained = starting_weights(files, args.overrides)
        run.phase = "setup"
        run.cli = build_cli(files, args.overrides)
        return _run_phases(run)
    except SIGTERMException as err:
        _report_interruption(run, err)
        raise SystemExit(SIGTERM_EXIT_CODE) from err
    except CheckpointWriteError as err:  # e.g. disk full: one message naming the file
        resume = _resume_file(run, err)
        hint = f"\nresume with: {resume_commands(args, resume)[0]}" if resume else ""
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


def _fit_and_test(run: ExpRun) -> tuple[dict[str, float], dict[str, float]]:
    """Fit (resuming from ``--ckpt_path``), then test the best checkpoint: the validation and test metrics."""
    cli, args = run.cli, run.args
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    ckpt_path = resolve_resume(trainer, args.ckpt_path)
    if ckpt_path is None:
        refuse_to_overwrite(trainer)
    run.phase = "fit"
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    run.done.append("fit")
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and getattr(ckpt, "best_model_score", None) is not None:
        val = {ckpt.monitor: float(ckpt.best_model_score)}
    else:
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if not (args.test and dm.test_split is not None):
        return val, {}
    run.phase = "test"
    best = getattr(ckpt, "best_model_path", "") if ckpt is not None else ""
    results = trainer.test(model, datamodule=dm, ckpt_path=best or None)
    test = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    test.update({k: float(v) for k, v in (results[0] if results else {}).items()})
    run.done.append("test")
    return val, test


def _run_phases(run: ExpRun) -> str:
    """Fit and test, then time, run the controls, time at full size, and write the summary."""
    args, cli = run.args, run.cli
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    val, test = _fit_and_test(run)
    log_dir = Path(trainer.log_dir or ".")  # every rank: a collective under DDP
    timing = None
    if args.timing_batches > 0 and model.backbone.reducer is not None and model.backbone.reducer.is_active:
        run.phase = "timing"
        batches = eval_batches(dm, args.timing_batches)
        timing = time_reduction(model, batches, args.timing_rounds, str(trainer.precision))
    run.phase = "controls"
    controls = control_runs(cli) if args.controls and args.test else {}
    full = None
    bench_name, batch_size = args.full_size, 4
    if bench_name == "auto":
        shapes = "shapes" in str(getattr(dm, "data_dir", ""))
        bench_name, batch_size = FULL_SIZE.get(model.backbone.family, (None, 4)) if shapes else (None, 4)
    if bench_name and bench_name != "none":
        run.phase = "full-size timing"
        full = time_full_size(bench_name, batch_size=batch_size, out_dir=log_dir / "full_size")
    wall = time.perf_counter() - run.start
    text = summary_text(args.name, cli, val, test, timing, controls, wall, full, run.pretrained)
    if trainer.is_global_zero:
        print("\n" + text + "\n", flush=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "summary.md").write_text(text + "\n")
        print(f"summary: {log_dir / 'summary.md'}; dashboard: tensorboard --logdir {log_dir.parent}")
    return text


def resume_commands(args: ExpArgs, ckpt_path: str) -> list[str]:
    """``make exp`` and ``python -m pumer_lightning.exp`` commands that continue this run from ``ckpt_path``."""
    rest = without_ckpt_path([a for a in args.argv if a != args.name])
    rest.append(f"--ckpt_path={ckpt_path}")
    return [
        f"make exp EXP={shlex.quote(args.name)} ARGS={shlex.quote(' '.join(shlex.quote(a) for a in rest))}",
        "python -m pumer_lightning.exp " + shlex.join([args.name, *rest]),
    ]


def _resume_file(run: ExpRun, err: BaseException) -> str | None:
    """The checkpoint to continue from after ``err``: what the interruption saved during the fit, else the
    fit's final ``last.ckpt`` (a finished fit resumes as a no-op and goes on to test and summarise)."""
    if run.cli is None:
        return None
    if "fit" not in run.done:
        return interruption_report(run.trainer, err)[1]
    ckpt = run.trainer.checkpoint_callback
    return getattr(ckpt, "last_model_path", "") or None if ckpt is not None else None


def _report_interruption(run: ExpRun, err: BaseException) -> None:
    """Print (and write to ``<log_dir>/summary.md``) what an interrupted ``make exp`` did and how to resume it."""
    trainer = run.trainer
    if trainer is not None and not trainer.is_global_zero:
        return
    lines = [f"## make exp {run.args.name}: interrupted", ""]
    if run.phase == "fit" and trainer is not None:
        message = interruption_report(trainer, err)[0]
        total = trainer.estimated_stepping_batches if trainer.max_steps in (None, -1) else trainer.max_steps
        of = f" of {int(total)}" if isinstance(total, (int, float)) and total not in (float("inf"), 0) else ""
        lines.append(f"- fit stopped at step {trainer.global_step}{of}: {message}")
    else:
        lines.append(f"- interrupted by SIGTERM during {run.phase}")
    lines.append(f"- finished before the interruption: {', '.join(run.done) or 'nothing'}")
    lines.append(f"- wall time: {(time.perf_counter() - run.start) / 60:.1f} min")
    resume = _resume_file(run, err)
    if resume:
        make, python = resume_commands(run.args, resume)
        lines += [f"- resume with: {make}", f"  (or: {python})"]
    else:
        lines.append("- nothing to resume: rerun the same command")
    text = "\n".join(lines)
    print("\n" + text + "\n", file=sys.stderr, flush=True)
    log_dir = Path(trainer.log_dir) if trainer is not None and trainer.log_dir else None
    if log_dir is not None and log_dir.is_dir() and "fit" in [*run.done, run.phase]:
        (log_dir / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    run()
