"""The ``make tune`` command line: read the experiment and the checkpoint, run the `Tuner`, write the outputs."""

from __future__ import annotations

import argparse
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pumer_lightning.cli import EXPERIMENTS_DIR, PumerCLI

from .assemble import assemble
from .cache import TuneCache, checkpoint_id, code_fingerprint, fingerprint
from .evaluate import Evaluator, resolve_device
from .report import write_hparams, write_outputs
from .space import SpaceError, build_space
from .tuner import Settings, Tuner

DEFAULT_EXP = "shapes_vilt"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pumer_lightning.tune", allow_abbrev=False,
        description="Choose a reducer schedule for a trained model: search, Pareto front, recommendation.",
        epilog="Every other --dotted.option=value is a configuration override, as for python -m pumer_lightning.",
    )  # fmt: skip
    p.add_argument(
        "name", nargs="?", default=None, help=f"experiment (experiments/NAME.yaml; default {DEFAULT_EXP})"
    )
    p.add_argument("-c", "--config", action="append", default=None,
                   help="configuration files instead of NAME (as the CLI takes them: base.yaml first; NAME is then ignored)")  # fmt: skip
    p.add_argument("--ckpt", "--ckpt_path", "--ckpt-path", dest="ckpt", default=None,
                   help="the trained checkpoint (default: the best-*.ckpt of the latest runs/<exp_name>/version_N)")  # fmt: skip
    p.add_argument("--split", default=None, help="search split (default: the data's validation split)")
    p.add_argument("--check-split", default="auto",
                   help="split the recommendation is re-evaluated on, never used to choose (default: the data's "
                   "test split; none: skip)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--batch-size", type=int, default=None, help="timing batch size (default: data.eval_batch_size)"
    )
    p.add_argument("--timing-batches", type=int, default=1, help="batches per timed pass")
    space = p.add_argument_group("search space (LO:HI ranges at --step, or comma lists)")
    space.add_argument("--layers", default="auto", help="layer sets: auto, 1,2;0,1 or [[1,2],[0,1]]")
    space.add_argument("--keep", default="0.5:1.0", help="keep_ratio values")
    space.add_argument("--merge", default="0:0.5", help="merge_ratio values")
    space.add_argument("--text-merge", default="0:0.3", help="text_merge_ratio values")
    space.add_argument("--text-merge-policy", default="real,pads_first", help="text_merge_policy values")
    space.add_argument("--importance", default="text,cls", help="importance values")
    space.add_argument("--step", type=float, default=0.05, help="grid step of LO:HI ranges")
    search = p.add_argument_group("search")
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
    search.add_argument("--z", type=float, default=1.0,
                        help="budget margin in standard errors: drop + z * SE <= max-drop (0: point estimate)")  # fmt: skip
    search.add_argument("--seed", type=int, default=0, help="sampling and evaluation seed")
    out = p.add_argument_group("outputs")
    out.add_argument("--out", default="results/tune", help="directory of <name>.{json,md,png,yaml}")
    out.add_argument("--out-name", default=None, help="output name (default: the experiment's)")
    out.add_argument("--cache", default=None, help="cache file (default: <run dir>/tune/cache.jsonl)")
    out.add_argument("--fresh", action="store_true", help="ignore the cache (measure everything again)")
    out.add_argument("--preload-gib", type=float, default=2.0, help="hold a split in memory when it fits")
    return p


def check_numbers(args: argparse.Namespace) -> None:
    """Flags with impossible values stop at once, each named."""
    rules = [("--candidates", args.candidates >= 0, ">= 0"), ("--eta", args.eta >= 2, ">= 2"),
             ("--min-finalists", args.min_finalists >= 1, ">= 1"), ("--rounds", args.rounds >= 1, ">= 1"),
             ("--final-rounds", args.final_rounds >= 1, ">= 1"), ("--timing-group", args.timing_group >= 1, ">= 1"),
             ("--timing-batches", args.timing_batches >= 1, ">= 1"), ("--max-drop", args.max_drop >= 0, ">= 0"),
             ("--z", args.z >= 0, ">= 0"),
             ("--generations", args.generations >= 0, ">= 0"), ("--children", args.children >= 1, ">= 1"),
             ("--parents", args.parents >= 1, ">= 1"),
             ("--playoff", args.playoff >= 1, ">= 1"), ("--playoff-rounds", args.playoff_rounds >= 1, ">= 1"), ("--step", args.step > 0, "> 0"),
             ("--batch-size", args.batch_size is None or args.batch_size >= 1, ">= 1")]  # fmt: skip
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
    name = args.name or DEFAULT_EXP
    path = Path(name) if name.endswith((".yaml", ".yml")) else EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml") if p.stem != "base")
        raise SystemExit(
            f"error: unknown experiment {name!r}: {path} does not exist. Available: {', '.join(names)}"
        )
    return [_relative(EXPERIMENTS_DIR / "base.yaml"), _relative(path)], path.stem


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (for commands printed in reports)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def build_cli(files: list[str], overrides: list[str]) -> PumerCLI:
    """The experiment's model, data module and trainer, as ``python -m pumer_lightning`` builds them (the
    shapes demo generates its data here if it is missing)."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # arguments are passed explicitly; keep LightningCLI quiet
    try:
        return PumerCLI(args=[a for f in files for a in ("-c", f)] + overrides, run=False)
    finally:
        sys.argv = argv


def _version(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_checkpoint(cli: PumerCLI, given: str | None, name: str) -> Path:
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


def config_fingerprint(cli: PumerCLI) -> str:
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
    """Machine, software and commit, for the report's header and the timing cache key."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = f"{names[0]} ({len(names)} logical CPUs)" if names else cpu
    except OSError:
        pass
    root = Path(__file__).resolve().parents[2]
    commit = _git(root, "rev-parse", "--short", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--", "pumer_lightning")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "machine": gpu or cpu, "cpu": cpu, "device": f"{device}" + (f" ({gpu})" if gpu else ""),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "commit": (commit or "unknown") + (" (with uncommitted changes)" if dirty else ""),
    }  # fmt: skip


def _git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# ---------------------------------------------------------------------------------------------- the run
def setup(args: argparse.Namespace, overrides: list[str]) -> tuple[Tuner, dict[str, Any]]:
    """The CLI, checkpoint, device, splits, search space, cache and `Tuner` of a run, plus what the report
    says about the experiment."""
    files, name = config_files(args)
    cli = build_cli(files, overrides)
    model, dm = cli.model, cli.datamodule
    ckpt = find_checkpoint(cli, args.ckpt, name)
    device = resolve_device(args.device)
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
    own = model.backbone.reducer
    try:
        space = build_space(
            layers=args.layers, keep=args.keep, merge=args.merge, text_merge=args.text_merge,
            policies=args.text_merge_policy, importance=args.importance, step=args.step,
            depth=model.backbone.num_layers, own=own, what=f"{model.spec.preset} backbone",
        )  # fmt: skip
    except SpaceError as err:
        raise SystemExit(f"error: {err}") from None
    evaluator = Evaluator(
        model, dm, ckpt, device, str(cli.trainer.precision), batch_size=args.batch_size or dm.eval_batch_size,
        timing_batches=args.timing_batches, preload_gib=args.preload_gib, seed=args.seed,
    )  # fmt: skip
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    cache = TuneCache(Path(args.cache) if args.cache else run_dir / "tune" / "cache.jsonl", fresh=args.fresh)
    env = environment(device)
    context = {"checkpoint": checkpoint_id(ckpt), "config": config_fingerprint(cli), "code": code_fingerprint(),
               "seed": args.seed,
               "device": env["device"], "threads": env["threads"]}  # fmt: skip
    settings = Settings(
        split=split, check_split=check, candidates=args.candidates, eta=args.eta, min_finalists=args.min_finalists,
        rounds=args.rounds, final_rounds=args.final_rounds, timing_group=args.timing_group,
        max_drop=args.max_drop, z=args.z, seed=args.seed, generations=args.generations, children=args.children,
        parents=args.parents, playoff=args.playoff, playoff_rounds=args.playoff_rounds,
    )  # fmt: skip
    info = {
        "name": args.out_name or name, "files": files, "overrides": overrides, "checkpoint": str(ckpt),
        "run_dir": run_dir, "environment": env, "task": model.task_name, "metric": evaluator.metric.split("/")[1],
        "preset": model.spec.preset, "own": own,
    }  # fmt: skip
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
