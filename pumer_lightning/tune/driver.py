"""The ``make tune`` command line: read the experiment and the checkpoint, run the `Tuner`, write the outputs."""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pumer_lightning.command import Command, flag
from pumer_lightning.lab.context import build_cli, experiment_files, resolve_device
from pumer_lightning.lab.machine import machine_info, short_commit

from .assemble import assemble
from .cache import TuneCache, checkpoint_id, code_fingerprint, fingerprint
from .evaluate import Evaluator
from .report import write_hparams, write_outputs
from .space import SpaceError, SpaceFlags, build_space
from .tuner import SearchFlags, Settings, Tuner, at_least

DEFAULT_EXP = "shapes_vilt"


@dataclass
class OutputFlags:
    """outputs"""

    out: str = "results/tune"
    """directory of <name>.{json,md,png,yaml}"""
    out_name: str | None = None
    """output name (default: the experiment's)"""
    cache: str | None = None
    """cache file (default: <run dir>/tune/cache.jsonl)"""
    fresh: bool = False
    """ignore the cache (measure everything again)"""
    preload_gib: float = 2.0
    """hold a split in memory when it fits"""


@dataclass
class TuneArgs:
    """Choose a reducer schedule for a trained model: search, Pareto front, recommendation."""

    name: str | None = field(default=None, metadata=flag(positional=True))
    """experiment (experiments/NAME.yaml; default shapes_vilt)"""
    config: list[str] = field(default_factory=list, metadata=flag("-c", "--config", repeat=True))
    """configuration files instead of NAME (as the CLI takes them: base.yaml first; NAME is then ignored)"""
    ckpt: str | None = field(default=None, metadata=flag("--ckpt", "--ckpt-path"))
    """the trained checkpoint (default: the best-*.ckpt of the latest runs/<exp_name>/version_N)"""
    split: str | None = None
    """search split (default: the data's validation split)"""
    check_split: str = "auto"
    """split the recommendation is re-evaluated on, never used to choose (default: the data's test split; none:
    skip)"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N"""
    batch_size: int | None = None
    """timing batch size (default: data.eval_batch_size)"""
    timing_batches: int = 1
    """batches per timed pass"""
    space: SpaceFlags = field(default_factory=SpaceFlags)
    search: SearchFlags = field(default_factory=SearchFlags)
    output: OutputFlags = field(default_factory=OutputFlags)
    command: str = field(default="", metadata=flag(cli=False))
    overrides: list[str] = field(default_factory=list, metadata=flag(cli=False))

    def __post_init__(self) -> None:
        at_least("--timing-batches", self.timing_batches, 1)
        if self.batch_size is not None:
            at_least("--batch-size", self.batch_size, 1)


def config_files(args: TuneArgs) -> tuple[list[str], str]:
    """The ``-c`` files (or ``base.yaml`` + ``<name>.yaml``) and the name the outputs take."""
    if args.config:
        missing = [f for f in args.config if not Path(f).is_file()]
        if missing:
            raise SystemExit(f"error: -c {missing[0]} does not exist")
        stems = [Path(f).stem for f in args.config if Path(f).stem != "base"]
        return list(args.config), stems[-1] if stems else "tune"
    files = experiment_files(args.name or DEFAULT_EXP)
    return files, Path(files[-1]).stem


def _version(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_checkpoint(cli: Any, given: str | None, name: str) -> Path:
    """``--ckpt``, or the newest ``best-*.ckpt`` of the latest ``<save_dir>/<exp_name>/version_N`` that ``make exp``
    finished (it writes ``summary.md`` last; a run still training has none), else of the latest that has one."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise SystemExit(
                f"error: --ckpt {given} does not exist (expected a .ckpt written by `make exp` or fit)"
            )
        return path
    logger = cli.trainer.logger
    root = Path(getattr(logger, "save_dir", None) or cli.trainer.default_root_dir) / str(
        getattr(logger, "name", None) or cli.config.get("exp_name")
    )
    found = []
    for version in sorted(root.glob("version_*"), key=_version, reverse=True):
        best = sorted(version.glob("checkpoints/best-*.ckpt"), key=lambda p: p.stat().st_mtime)
        if best:
            found.append((version, best[-1]))
    finished = [ckpt for version, ckpt in found if (version / "summary.md").is_file()]
    if finished or found:
        chosen = (finished or [ckpt for _, ckpt in found])[0]
        print(f"checkpoint: {chosen} (the latest {'finished ' if finished else ''}run of {root})", flush=True)
        return chosen
    raise SystemExit(
        f"error: no trained checkpoint: {root}/version_*/checkpoints/best-*.ckpt does not exist. Run "
        f"`make exp EXP={name}` first (it trains the model and writes it), or pass --ckpt <file.ckpt>"
    )


def config_fingerprint(cli: Any) -> str:
    """What the figures depend on besides the schedule: model and data configuration, precision."""
    config = cli.config.as_dict() if hasattr(cli.config, "as_dict") else dict(cli.config)
    model = dict(config.get("model") or {})
    model["init_args"] = {k: v for k, v in (model.get("init_args") or {}).items() if k != "reducer"}
    loader = ("num_workers", "persistent_workers", "pin_memory", "worker_start_method")
    data = {k: v for k, v in (config.get("data") or {}).items() if k not in loader}
    return fingerprint(
        {"model": model, "data": data, "precision": (config.get("trainer") or {}).get("precision")}
    )


def environment(device: torch.device) -> dict[str, Any]:
    """Machine, software and commit (`pumer_lightning.lab.machine.machine_info`), with the summary the report's
    header and the timing cache key read."""
    info = machine_info(device)
    hw, sw = info["hardware"], info["software"]
    cpu = f"{hw['cpu']} ({hw['logical_cpus']} logical CPUs)"
    gpu = hw.get("gpu")
    return {
        "machine": gpu or cpu,
        "cpu": cpu,
        "device": f"{device}" + (f" ({gpu})" if gpu else ""),
        "threads": hw["threads"],
        "torch": sw["torch"],
        "python": sw["python"],
        "commit": short_commit(sw["git_commit"]),
        **info,
    }


# ---------------------------------------------------------------------------------------------- the run
def splits(args: TuneArgs, dm: Any) -> tuple[str, str | None]:
    """The search split and the check split (None: no check), each checked to exist in the data."""
    split = args.split or dm.val_split
    check = (dm.test_split if args.check_split == "auto" else args.check_split) or None
    check = None if check == "none" else check
    for option, value in (("--split", split), ("--check-split", check)):
        if option == "--split" and not value:
            raise SystemExit("error: the data has no validation split; name the search split with --split")
        try:
            if value:
                dm.split_meta(value)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: {option} {value}: {err}") from None
    return split, check


def search_space(flags: SpaceFlags, model: Any) -> Any:
    """The search space of the flags, for ``model``'s backbone; a bad value names its flag."""
    backbone = model.backbone
    try:
        return build_space(flags, backbone.num_layers, backbone.reducer, f"{model.spec.preset} backbone")
    except SpaceError as err:
        raise SystemExit(f"error: {err}") from None


def setup(args: TuneArgs) -> tuple[Tuner, dict[str, Any]]:
    """The CLI, checkpoint, device, splits, search space, cache and `Tuner` of a run, plus what the report
    says about the experiment."""
    files, name = config_files(args)
    cli = build_cli(files, args.overrides)
    model, dm = cli.model, cli.datamodule
    ckpt = find_checkpoint(cli, args.ckpt, name)
    device = resolve_device(args.device)
    split, check = splits(args, dm)
    space = search_space(args.space, model)
    evaluator = Evaluator(
        model,
        dm,
        ckpt,
        device,
        str(cli.trainer.precision),
        batch_size=args.batch_size or dm.eval_batch_size,
        timing_batches=args.timing_batches,
        preload_gib=args.output.preload_gib,
        seed=args.search.seed,
    )
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = args.output
    cache = TuneCache(Path(out.cache) if out.cache else run_dir / "tune" / "cache.jsonl", fresh=out.fresh)
    env = environment(device)
    context = {
        "checkpoint": checkpoint_id(ckpt),
        "config": config_fingerprint(cli),
        "code": code_fingerprint(),
        "seed": args.search.seed,
        "device": env["device"],
        "threads": env["threads"],
    }
    settings = Settings(**dataclasses.asdict(args.search), split=split, check_split=check)
    own = model.backbone.reducer
    info = {
        "name": out.out_name or name,
        "files": files,
        "overrides": args.overrides,
        "checkpoint": str(ckpt),
        "run_dir": run_dir,
        "environment": env,
        "task": model.task_name,
        "metric": evaluator.metric.split("/")[1],
        "preset": model.spec.preset,
        "own": own,
    }
    return Tuner(evaluator, cache, space, settings, context, own), info


def tune(args: TuneArgs) -> dict[str, Any]:
    """Run the search the flags describe; returns the result that ``<out>/<name>.json`` holds."""
    start = time.perf_counter()
    tuner, info = setup(args)
    outcome = tuner.run()
    result = assemble(tuner, info, outcome, Path(args.output.out), args.command)
    result["wall_s"] = time.perf_counter() - start
    stages = {"setup": result["wall_s"] - sum(tuner.stage_seconds.values()), **tuner.stage_seconds}
    result["stage_text"] = ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
    paths = write_outputs(result, Path(args.output.out))
    write_hparams(result, Path(result["hparams_dir"]))
    print(f"\n{result['recommendation']['text']}\n", flush=True)
    if result.get("check"):
        print(result["check"]["verdict"] + "\n", flush=True)
    print("wrote " + ", ".join(str(p) for p in paths.values()) + f"; HParams: {result['hparams_dir']}")
    return result


COMMAND = Command(
    TuneArgs,
    tune,
    prog="python -m pumer_lightning.tune",
    epilog="Every other --dotted.option=value is a configuration override, as for python -m pumer_lightning.",
    overrides=True,
)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m pumer_lightning.tune`` (``pumer tune``, ``make tune``)."""
    return COMMAND.main(argv)
