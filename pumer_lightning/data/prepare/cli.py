"""The converter CLI: ``python -m pumer_lightning.data.prepare {nlvr2,vqa2,snli_ve,flickr30k,coco} --src DIR --out DIR``."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pumer_lightning.command import Command, flag

from ..writer import SplitSummary
from . import nlvr2, retrieval, snli_ve, vqa2
from .common import PreparedSplit, write_split

# dataset -> (task, planner)
DATASETS: dict[str, tuple[str, Callable[..., list[PreparedSplit]]]] = {
    "nlvr2": ("nlvr2", nlvr2.prepare),
    "vqa2": ("vqa2", vqa2.prepare),
    "snli_ve": ("snli_ve", snli_ve.prepare),
    "flickr30k": ("retrieval", lambda *a, **k: retrieval.prepare(*a, dataset="flickr30k", **k)),
    "coco": ("retrieval", lambda *a, **k: retrieval.prepare(*a, dataset="coco", **k)),
}


def convert(
    dataset: str,
    src: str | Path,
    out: str | Path | None = None,
    *,
    images: str | Path | None = None,
    splits: list[str] | None = None,
    shard_size: int = 256,
    workers: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    min_count: int = 9,
) -> list[SplitSummary]:
    """Convert ``dataset`` from the official files under ``src`` into ``out/<split>/`` shards.

    Re-running is cheap: shards whose planned content is unchanged are kept (``overwrite`` rewrites them).
    Returns one summary per split (records, examples, skipped by reason).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a directory")
    if images is not None and not Path(images).is_dir():
        raise FileNotFoundError(f"--images {images} is not a directory")
    out = Path(out) if out is not None else Path("data") / dataset
    task, planner = DATASETS[dataset]
    kwargs = {"min_count": min_count} if dataset == "vqa2" else {}
    prepared = planner(src, splits, Path(images) if images else None, seed, **kwargs)
    command = f"pumer_lightning.data.prepare {dataset}"
    return [
        write_split(
            p,
            out,
            task=task,
            dataset=dataset,
            shard_size=shard_size,
            workers=workers,
            overwrite=overwrite,
            progress=progress,
            command=command,
        )
        for p in prepared
    ]


@dataclass
class PrepareArgs:
    """Convert official dataset files into WebDataset shards + meta.json per split."""

    dataset: str = field(metadata=flag(positional=True, choices=sorted(DATASETS)))
    """which dataset to convert"""
    src: str
    """directory holding the official files (see docs/data.md)"""
    out: str | None = None
    """output root (default: data/<dataset>)"""
    images: str | None = None
    """image folder, if not under --src"""
    splits: str | None = None
    """comma-separated output splits (default: all found)"""
    shard_size: int = 256
    """records (images or pairs) per shard"""
    workers: int = 8
    """threads reading image files"""
    seed: int = 0
    """seed of the training record order"""
    min_count: int = 9
    """vqa2: min questions per kept answer"""
    overwrite: bool = False
    """rewrite shards that are already up to date"""
    progress: bool = True
    """a progress bar"""


def run_prepare(args: PrepareArgs) -> int:
    """Convert, then print one summary per split; 2 (and a message) when a source is missing or refused."""
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    start = time.perf_counter()
    try:
        summaries = convert(
            args.dataset,
            args.src,
            args.out,
            images=args.images,
            splits=splits,
            shard_size=args.shard_size,
            workers=args.workers,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=args.progress,
            min_count=args.min_count,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{args.dataset}: done in {time.perf_counter() - start:.1f}s")
    for summary in summaries:
        print("\n".join(summary.lines()))
    return 0


COMMAND = Command(PrepareArgs, run_prepare, prog="python -m pumer_lightning.data.prepare")


def main(argv: list[str] | None = None) -> int:
    """``python -m pumer_lightning.data.prepare`` (``pumer prepare``)."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
