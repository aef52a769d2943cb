"""Loader throughput: decoded + transformed + collated examples per second, per worker process.

    python -m pumer_lightning.data.throughput --data-dir data/shapes/nlvr2 --image-size 384 --workers 1,2

For each worker count it builds the DataModule's loader for ``--split``, discards the first batches (worker
start-up, shuffle-buffer fill), then counts examples for ``--seconds``. Examples/s per worker is the figure to
compare with a model's training step rate: a GPU step at batch B and S steps/s needs B*S examples/s in total.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pumer_lightning.command import Command

from .schema import read_split_meta
from .transforms import backbone_image_config


def measure(
    data_dir: str | Path,
    tokenizer: str | Path,
    *,
    split: str = "train",
    image_size: int = 384,
    family: str = "vilt",
    batch_size: int = 32,
    num_workers: int = 1,
    seconds: float = 10.0,
    warmup_batches: int = 2,
    randaugment: bool = False,
    train: bool = True,
) -> dict[str, float]:
    """Time one loader configuration; returns examples/s overall and per worker."""
    from .datamodule import VLDataModule

    meta = read_split_meta(Path(data_dir) / split)
    cfg = backbone_image_config(family, image_size)  # type: ignore[arg-type]
    dm = VLDataModule(
        task=meta.task,  # type: ignore[arg-type]
        data_dir=str(data_dir),
        tokenizer=str(tokenizer),
        image_size=cfg.image_size,
        image_mean=cfg.mean,
        image_std=cfg.std,
        resize=cfg.resize,
        batch_size=batch_size,
        num_workers=num_workers,
        randaugment=randaugment,
        train_split=split,
        val_split=None,
        test_split=None,
        shuffle_buffer=min(1000, meta.num_samples),
        persistent_workers=False,
    )
    if train:
        loader = dm.train_dataloader()
        loader.num_batches = 10**9  # time the endless stream, not one epoch
    else:
        loader = dm.eval_dataloader(split)
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it, None)
    n_examples, n_batches = 0, 0
    start = time.perf_counter()
    for batch in it:
        n_examples += len(batch["keys"])
        n_batches += 1
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    del it
    rate = n_examples / elapsed if elapsed > 0 else 0.0
    return {
        "workers": num_workers,
        "examples": n_examples,
        "batches": n_batches,
        "seconds": round(elapsed, 2),
        "examples_per_s": round(rate, 1),
        "examples_per_s_per_worker": round(rate / max(1, num_workers), 1),
        "images_per_example": dm.n_images,
    }


@dataclass
class LoaderBenchArgs:
    """Loader throughput: decoded + transformed + collated examples per second, per worker process."""

    data_dir: str
    """dataset root, e.g. data/shapes/nlvr2"""
    split: str = "train"
    """the split whose loader is timed"""
    tokenizer: str | None = None
    """tokenizer directory (default: <data-dir>/../tokenizer)"""
    image_size: int = 384
    """image side in pixels"""
    family: Literal["vilt", "clip"] = "vilt"
    """resize + normalisation preset"""
    batch_size: int = 32
    """examples per batch"""
    workers: str = "1,2"
    """comma-separated worker counts to time (0 = main process)"""
    seconds: float = 10.0
    """timed seconds per worker count"""
    randaugment: bool = False
    """include RandAugment (training transform)"""
    eval: bool = False
    """time the evaluation loader (one pass, no shuffling)"""
    json: bool = False
    """print JSON lines instead of a table"""

    def __post_init__(self) -> None:
        try:
            counts = self.worker_counts
        except ValueError:
            raise ValueError(f"--workers {self.workers!r}: expected comma-separated integers") from None
        if min(counts) < 0:
            raise ValueError(f"--workers {self.workers!r}: worker counts are >= 0")

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.tokenizer) if self.tokenizer else Path(self.data_dir).parent / "tokenizer"

    @property
    def worker_counts(self) -> list[int]:
        return [int(w) for w in self.workers.split(",")]


def run_loader_bench(args: LoaderBenchArgs) -> int:
    """Time the loader at each worker count; print a table (or JSON lines). 2 when there is no tokenizer."""
    data_dir = Path(args.data_dir)
    if not args.tokenizer_dir.is_dir():
        print(
            f"error: tokenizer directory {args.tokenizer_dir} does not exist; pass --tokenizer DIR",
            file=sys.stderr,
        )
        return 2
    results = []
    for nw in args.worker_counts:
        res = measure(
            data_dir,
            args.tokenizer_dir,
            split=args.split,
            image_size=args.image_size,
            family=args.family,
            batch_size=args.batch_size,
            num_workers=nw,
            seconds=args.seconds,
            randaugment=args.randaugment,
            train=not args.eval,
        )
        results.append(res)
        if args.json:
            print(json.dumps(res), flush=True)
    if not args.json:
        print(
            f"{data_dir}/{args.split}: {args.image_size} px, {args.family}, batch {args.batch_size}, "
            f"randaugment={args.randaugment}, {'eval' if args.eval else 'train'} loader"
        )
        print(f"{'workers':>8} {'examples/s':>11} {'per worker':>11} {'images/s':>9}")
        for r in results:
            print(
                f"{r['workers']:>8} {r['examples_per_s']:>11.1f} {r['examples_per_s_per_worker']:>11.1f} "
                f"{r['examples_per_s'] * r['images_per_example']:>9.1f}"
            )
    return 0


COMMAND = Command(LoaderBenchArgs, run_loader_bench, prog="python -m pumer_lightning.data.throughput")


def main(argv: list[str] | None = None) -> int:
    """``python -m pumer_lightning.data.throughput`` (``pumer loader-bench``, ``make loader-bench``)."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
