"""Loader throughput: decoded + transformed + collated examples per second, per worker process.

    python -m pumer_lightning.data.throughput --data-dir data/shapes/nlvr2 --image-size 384 --workers 1,2

For each worker count it builds the DataModule's loader for ``--split``, discards the first batches (worker
start-up, shuffle-buffer fill), then counts examples for ``--seconds``. Examples/s per worker is the figure to
compare with a model's training step rate: a GPU step at batch B and S steps/s needs B*S examples/s in total.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pumer_lightning.data.throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--data-dir", required=True, help="dataset root, e.g. data/shapes/nlvr2")
    p.add_argument("--split", default="train")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: <data-dir>/../tokenizer)")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--family", choices=("vilt", "clip"), default="vilt", help="resize + normalisation preset")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--workers", default="1,2", help="comma-separated worker counts to time (0 = main process)"
    )
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per worker count")
    p.add_argument("--randaugment", action="store_true", help="include RandAugment (training transform)")
    p.add_argument("--eval", action="store_true", help="time the evaluation loader (one pass, no shuffling)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir)
    tokenizer = Path(args.tokenizer) if args.tokenizer else data_dir.parent / "tokenizer"
    if not tokenizer.is_dir():
        p.error(f"tokenizer directory {tokenizer} does not exist; pass --tokenizer DIR")
    try:
        counts = [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error(f"--workers {args.workers!r}: expected comma-separated integers")
    results = []
    for nw in counts:
        res = measure(
            data_dir,
            tokenizer,
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


if __name__ == "__main__":
    sys.exit(main())
