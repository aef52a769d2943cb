"""The ``make tune`` command line: read the experiment and the checkpoint, run the `Tuner`, write the outputs."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pumer_lightning.lab.context import build_cli, experiment_files, resolve_device
from pumer_lightning.lab.machine import machine_info, short_commit

from .assemble import assemble
from .cache import TuneCache, checkpoint_id, code_fingerprint, fingerprint
from .evaluate import Evaluator
from .report import write_hparams, write_outputs
from .space import SpaceError, build_space
from .tuner import Settings, Tuner

DEFAULT_EXP = "shapes_vilt"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pumer_lightning.tune",
        allow_abbrev=False,
        description="Choose a reducer schedule for a trained model: search, Pareto front, recommendation.",
        epilog="Every other --dotted.option=value is a configuration override, as for python -m pumer_lightning.",
    )
    p.add_argument(
        "name", nargs="?", default=None, help=f"experiment (experiments/NAME.yaml; default {DEFAULT_EXP})"
    )
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=None,
        help="configuration files instead of NAME (as the CLI takes them: base.yaml first; NAME is then ignored)",
    )
    p.add_argument(
        "--ckpt",
        "--ckpt_path",
        "--ckpt-path",
        dest="ckpt",
        default=None,
        help="the trained checkpoint (default: the best-*.ckpt of the latest runs/<exp_name>/version_N)",
    )
    p.add_argument("--split", default=None, help="search split (default: the data's validation split)")
    p.add_argument(
        "--check-split",
        default="auto",
        help="split the recommendation is re-evaluated on, never used to choose (default: the data's "
        "test split; none: skip)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--batch-size", type=int, default=None, help="timing batch size (default: data.eval_batch_size)"
    )
    p.add_argument("--timing-batches", type=int, default=1, help="batches per timed pass")
    space_flags(p.add_argument_group("search space (LO:HI ranges at --step, or comma lists)"))
    search_flags(p.add_argument_group("search"))
    output_flags(p.add_argument_group("outputs"))
    return p


def space_flags(space: Any) -> None:
    """The search space's flags (LO:HI ranges at ``--step``, or comma lists)."""
    space.add_argument("--layers", default="auto", help="layer sets: auto, 1,2;0,1 or [[1,2],[0,1]]")
    space.add_argument("--keep", default="0.5:1.0", help="keep_ratio values")
    space.add_argument("--merge", default="0:0.5", help="merge_ratio values")
    space.add_argument("--text-merge", default="0:0.3", help="text_merge_ratio values")
    space.add_argument("--text-merge-policy", default="real,pads_first", help="text_merge_policy values")
    space.add_argument("--importance", default="text,cls", help="importance values")
    space.add_argument("--step", type=float, default=0.05, help="grid step of LO:HI ranges")


def search_flags(search: Any) -> None:
    """How the search runs: sampling, halving, timing rounds, generations, the budget."""
    search.add_argument("--candidates", type=int, default=40, help="schedules sampled from the space")
    search.add_argument(
        "--eta", type=int, default=2, help="halving factor: 1/eta of the schedules survive a rung"
    )
    search.add_argument("--min-finalists", type=int, default=8, help="schedules scored on the whole split")
    search.add_argument("--rounds", type=int, default=3, help="interleaved rounds when screening")
    search.add_argument(
        "--final-rounds", type=int, default=5, help="interleaved rounds for finalists and the check"
    )
    search.add_argument("--timing-group", type=int, default=16, help="schedules per screening session")
    search.add_argument(
        "--generations", type=int, default=1, help="rounds of mutating the front near the budget"
    )
    search.add_argument("--children", type=int, default=12, help="new schedules per generation")
    search.add_argument("--parents", type=int, default=3, help="front points mutated per generation")
    search.add_argument(
        "--playoff", type=int, default=4, help="fastest eligible finalists timed again together"
    )
    search.add_argument(
        "--playoff-rounds", type=int, default=10, help="interleaved rounds of the playoff and check"
    )
    search.add_argument("--max-drop", type=float, default=1.0, help="accuracy budget in points vs unreduced")
    search.add_argument(
        "--z",
        type=float,
        default=1.0,
        help="budget margin in standard errors: drop + z * SE <= max-drop (0: point estimate)",
    )
    search.add_argument("--seed", type=int, default=0, help="sampling and evaluation seed")


def output_flags(out: Any) -> None:
    """Where the outputs and the cache go."""
    out.add_argument("--out", default="results/tune", help="directory of <name>.{json,md,png,yaml}")
    out.add_argument("--out-name", default=None, help="output name (default: the experiment's)")
    out.add_argument("--cache", default=None, help="cache file (default: <run dir>/tune/cache.jsonl)")
    out.add_argument("--fresh", action="store_true", help="ignore the cache (measure everything again)")
    out.add_argument("--preload-gib", type=float, default=2.0, help="hold a split in memory when it fits")


def check_numbers(args: argparse.Namespace) -> None:
    """Flags with impossible values stop at once, each named."""
    rules = [
        ("--candidates", args.candidates >= 0, ">= 0"),
        ("--eta", args.eta >= 2, ">= 2"),
        ("--min-finalists", args.min_finalists >= 1, ">= 1"),
        ("--rounds", args.rounds >= 1, ">= 1"),
        ("--final-rounds", args.final_rounds >= 1, ">= 1"),
        ("--timing-group", args.timing_group >= 1, ">= 1"),
        ("--timing-batches", args.timing_batches >= 1, ">= 1"),
        ("--max-drop", args.max_drop >= 0, ">= 0"),
        ("--z", args.z >= 0, ">= 0"),
        ("--generations", args.generations >= 0, ">= 0"),
        ("--children", args.children >= 1, ">= 1"),
        ("--parents", args.parents >= 1, ">= 1"),
        ("--playoff", args.playoff >= 1, ">= 1"),
        ("--playoff-rounds", args.playoff_rounds >= 1, ">= 1"),
        ("--step", args.step > 0, "> 0"),
        ("--batch-size", args.batch_size is None or args.batch_size >= 1, ">= 1"),
    ]
    for flag, ok, expected in rules:
        if not ok:
            raise SystemExit(
                f"error: {flag} must be {expected}, got {getattr(args, flag[2:].replace('-', '_'))}"
            )


def config_files(args: argparse.Namespace) -> tuple[list[str], str]:
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
def splits(args: argparse.Namespace, dm: Any) -> tuple[str, str | None]:
    """The search split and the check split (None: no check), each checked to exist in the data."""
    split = args.split or dm.val_split
    check = (dm.test_split if args.check_split == "auto" else args.check_split) or None
    check = None if check == "none" else check
    for flag, value in (("--split", split), ("--check-split", check)):
        if flag == "--split" and not value:
            raise SystemExit("error: the data has no validation split; name the search split with --split")
        try:
            if value:
                dm.split_meta(value)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: {flag} {value}: {err}") from None
    return split, check


def search_space(args: argparse.Namespace, model: Any) -> Any:
    """The search space of the flags, for ``model``'s backbone; a bad value names its flag."""
    try:
        return build_space(
            layers=args.layers,
            keep=args.keep,
            merge=args.merge,
            text_merge=args.text_merge,
            policies=args.text_merge_policy,
            importance=args.importance,
            step=args.step,
            depth=model.backbone.num_layers,
            own=model.backbone.reducer,
            what=f"{model.spec.preset} backbone",
        )
    except SpaceError as err:
        raise SystemExit(f"error: {err}") from None


def setup(args: argparse.Namespace, overrides: list[str]) -> tuple[Tuner, dict[str, Any]]:
    """The CLI, checkpoint, device, splits, search space, cache and `Tuner` of a run, plus what the report
    says about the experiment."""
    files, name = config_files(args)
    cli = build_cli(files, overrides)
    model, dm = cli.model, cli.datamodule
    ckpt = find_checkpoint(cli, args.ckpt, name)
    device = resolve_device(args.device)
    split, check = splits(args, dm)
    space = search_space(args, model)
    evaluator = Evaluator(
        model,
        dm,
        ckpt,
        device,
        str(cli.trainer.precision),
        batch_size=args.batch_size or dm.eval_batch_size,
        timing_batches=args.timing_batches,
        preload_gib=args.preload_gib,
        seed=args.seed,
    )
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    cache = TuneCache(Path(args.cache) if args.cache else run_dir / "tune" / "cache.jsonl", fresh=args.fresh)
    env = environment(device)
    context = {
        "checkpoint": checkpoint_id(ckpt),
        "config": config_fingerprint(cli),
        "code": code_fingerprint(),
        "seed": args.seed,
        "device": env["device"],
        "threads": env["threads"],
    }
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)}
    settings = Settings(**{**flags, "split": split, "check_split": check})
    own = model.backbone.reducer
    info = {
        "name": args.out_name or name,
        "files": files,
        "overrides": overrides,
        "checkpoint": str(ckpt),
        "run_dir": run_dir,
        "environment": env,
        "task": model.task_name,
        "metric": evaluator.metric.split("/")[1],
        "preset": model.spec.preset,
        "own": own,
    }
    return Tuner(evaluator, cache, space, settings, context, own), info


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m pumer_lightning.tune``: returns the result that ``<out>/<name>.json`` holds."""
    start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parser().parse_known_args(argv)
    check_numbers(args)
    tuner, info = setup(args, overrides)
    outcome = tuner.run()
    result = assemble(tuner, info, outcome, args, "python -m pumer_lightning.tune " + shlex.join(argv))
    result["wall_s"] = time.perf_counter() - start
    stages = {"setup": result["wall_s"] - sum(tuner.stage_seconds.values()), **tuner.stage_seconds}
    result["stage_text"] = ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
    paths = write_outputs(result, Path(args.out))
    write_hparams(result, Path(result["hparams_dir"]))
    print(f"\n{result['recommendation']['text']}\n", flush=True)
    if result.get("check"):
        print(result["check"]["verdict"] + "\n", flush=True)
    print("wrote " + ", ".join(str(p) for p in paths.values()) + f"; HParams: {result['hparams_dir']}")
    return result
