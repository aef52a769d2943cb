"""Generating a shapes dataset from its specification: records, shards, ``meta.json``, the command line."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from pumer_lightning.command import Command

from ..schema import (
    NLVR2_LABELS,
    SNLI_VE_LABELS,
    TASKS,
    ShardInfo,
    SplitMeta,
    shard_name,
    write_json_atomic,
    write_split_meta,
)
from ..writer import encode_record, write_shard
from .texts import nlvr2_record, retrieval_record, snli_ve_record, vqa_record
from .world import (
    SPLITS,
    STATEMENT_TYPES,
    TEXTS_PER_RECORD,
    VQA_ANSWERS,
    World,
    encode_image,
    render,
    save_tokenizer,
    scene_json,
)

log = logging.getLogger(__name__)


@dataclass
class ShapesSpec:
    """Everything that determines a generated shapes dataset (stored in ``<out>/shapes.json``)."""

    seed: int = 0
    num_train: int = 2000
    num_val: int = 500
    num_test: int = 500
    tasks: tuple[str, ...] = TASKS
    world: World = field(default_factory=World)
    types: tuple[str, ...] | None = None  # restrict statement types (None: all of each task's types)
    image_format: str = "jpg"
    shard_size: int = 250  # records per shard

    def num(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    def task_types(self, task: str) -> tuple[str, ...]:
        own = STATEMENT_TYPES[task]
        if self.types is None or task == "retrieval":
            return own
        chosen = tuple(t for t in own if t in self.types)
        if not chosen:
            raise ValueError(f"--types {','.join(self.types)} leaves no statement type for {task} ({own})")
        return chosen

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        out["types"] = list(self.types) if self.types is not None else None
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShapesSpec:
        obj = dict(obj)
        obj["world"] = World(**obj["world"])
        obj["tasks"] = tuple(obj["tasks"])
        obj["types"] = tuple(obj["types"]) if obj.get("types") is not None else None
        return cls(**obj)

    def task_json(self, task: str) -> dict[str, Any]:
        """The part of the spec that determines one task's data."""
        out = self.to_json()
        out.pop("tasks")
        out["task"] = task
        return out


def _record_rng(seed: int, task: str, split: str, index: int) -> tuple[random.Random, np.random.Generator]:
    ints = [seed, TASKS.index(task), SPLITS.index(split), index]
    return random.Random(f"shapes/{ints}"), np.random.default_rng(ints)


def make_record(spec: ShapesSpec, task: str, split: str, index: int, first_text: int, n_texts: int):
    """Record ``index`` of a split: (key, json payload, images) — deterministic from the spec."""
    rng, nprng = _record_rng(spec.seed, task, split, index)
    world = spec.world
    types = spec.task_types(task)
    key = f"shapes-{split}-{index:07d}"
    if task == "nlvr2":
        stype = types[index % len(types)]
        label = (index // len(types)) % 2 == 0
        scenes, entry = nlvr2_record(rng, world, stype, label)
        entries = [entry]
    elif task == "vqa2":
        scenes, entries = vqa_record(rng, world, types, first_text, n_texts)
    elif task == "snli_ve":
        scenes, entries = snli_ve_record(rng, world, types, index)
        entries = entries[:n_texts]
    else:
        scenes, entries = retrieval_record(rng, world, n_texts)
    for j, entry in enumerate(entries):
        entry["text_id"] = f"{key}-{j}"
        if task == "vqa2":
            entry["question_id"] = (SPLITS.index(split) + 1) * 10**8 + first_text + j
    info: dict[str, Any] = {"image_id": key, "texts": entries, "scenes": [scene_json(s) for s in scenes]}
    if task == "retrieval":
        info["image_index"] = index
    images = [encode_image(render(s, world, nprng), spec.image_format) for s in scenes]
    return key, info, images


def _plan(spec: ShapesSpec, task: str, split: str) -> list[tuple[int, int, int]]:
    """(record index, first text index, number of texts) for every record of a split."""
    total, per = spec.num(split), TEXTS_PER_RECORD[task]
    return [(i, first, min(per, total - first)) for i, first in enumerate(range(0, total, per))]


def _write_shard_job(
    job: tuple[ShapesSpec, str, str, int, list[tuple[int, int, int]], str],
) -> dict[str, Any]:
    spec, task, split, shard_index, records, out_dir = job
    types: Counter = Counter()
    labels: Counter = Counter()
    n_samples = 0

    def samples():
        nonlocal n_samples
        for index, first, n in records:
            key, info, images = make_record(spec, task, split, index, first, n)
            for e in info["texts"]:
                types[e["statement_type"]] += 1
                if "label" in e and not isinstance(e["label"], dict):
                    labels[str(e["label"])] += 1
            n_samples += len(info["texts"])
            yield encode_record(key, info, images)

    name = shard_name(task, split, shard_index)
    n = write_shard(Path(out_dir) / name, samples())
    return {"name": name, "records": n, "samples": n_samples, "types": types, "labels": labels}


def _labels_for(task: str) -> list[str] | None:
    return {"nlvr2": list(NLVR2_LABELS), "snli_ve": list(SNLI_VE_LABELS), "vqa2": VQA_ANSWERS}.get(task)


def generate(spec: ShapesSpec, out: str | Path, workers: int | None = None, progress: bool = True) -> Path:
    """Generate every requested task and split of ``spec`` under ``out`` (overwriting), plus the tokenizer."""
    out = Path(out)
    for task in spec.tasks:
        if task not in TASKS:
            raise ValueError(f"--tasks: unknown task {task!r} (choose from {', '.join(TASKS)})")
        spec.task_types(task)
    workers = workers or min(os.cpu_count() or 1, 8)
    out.mkdir(parents=True, exist_ok=True)
    jobs, dirs = [], {}
    for task in spec.tasks:
        for split in SPLITS:
            if spec.num(split) <= 0:
                continue
            final = out / task / split
            tmp = out / task / f".{split}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            dirs[(task, split)] = (tmp, final)
            plan = _plan(spec, task, split)
            for k in range(0, len(plan), spec.shard_size):
                jobs.append(
                    (spec, task, split, k // spec.shard_size, plan[k : k + spec.shard_size], str(tmp))
                )
    results: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in dirs}
    total = sum(len(j[4]) for j in jobs)
    bar = tqdm(total=total, desc="shapes", unit="rec", disable=not progress)
    start = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            workers
        ) as pool:
            for job, res in zip(jobs, pool.imap(_write_shard_job, jobs)):
                results[(job[1], job[2])].append(res)
                bar.update(len(job[4]))
    else:
        for job in jobs:
            results[(job[1], job[2])].append(_write_shard_job(job))
            bar.update(len(job[4]))
    bar.close()
    for (task, split), shard_results in results.items():
        tmp, final = dirs[(task, split)]
        shard_results.sort(key=lambda r: r["name"])
        types: Counter = Counter()
        labels: Counter = Counter()
        for r in shard_results:
            types.update(r["types"])
            labels.update(r["labels"])
        meta = SplitMeta.from_shards(
            task=task,
            split=split,
            dataset=f"shapes-{task}",
            shards=[ShardInfo(r["name"], r["records"], r["samples"]) for r in shard_results],
            labeled=task != "retrieval",
            labels=_labels_for(task),
            created_by="pumer_lightning.data.shapes",
            extra={
                "spec": spec.task_json(task),
                "statement_types": dict(types),
                "label_counts": dict(labels),
            },
        )
        write_split_meta(tmp, meta)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    save_tokenizer(out / "tokenizer")
    write_json_atomic(out / "shapes.json", spec.to_json())
    log.info("shapes: %d records in %.1fs -> %s", total, time.perf_counter() - start, out)
    return out


def ensure_shapes(
    root: str | Path = "data/shapes",
    *,
    num_train: int = 2000,
    num_val: int = 500,
    num_test: int = 500,
    seed: int = 0,
    tasks: tuple[str, ...] | list[str] = TASKS,
    image_size: int = 384,
    patch_size: int = 32,
    object_cells: int = 1,
    types: tuple[str, ...] | list[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate the shapes world under ``root`` unless the same data are already there; returns ``root``.

    "The same" means ``<root>/shapes.json`` records an identical specification, every requested task has its
    three ``meta.json`` files and the tokenizer exists. Otherwise everything is regenerated.
    """
    spec = ShapesSpec(
        seed=seed,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        tasks=tuple(tasks),
        world=World(image_size=image_size, patch_size=patch_size, object_cells=object_cells),
        types=tuple(types) if types is not None else None,
    )
    root = Path(root)
    if is_current(root, spec):
        return root
    return generate(spec, root, workers=workers, progress=progress)


def is_current(root: str | Path, spec: ShapesSpec) -> bool:
    """Whether ``root`` already holds the data ``spec`` describes."""
    root = Path(root)
    try:
        stored = json.loads((root / "shapes.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if stored != spec.to_json() or not (root / "tokenizer" / "tokenizer.json").is_file():
        return False
    return all(
        (root / task / split / "meta.json").is_file()
        for task in spec.tasks
        for split in SPLITS
        if spec.num(split)
    )


@dataclass
class ShapesArgs:
    """Generate the synthetic shapes world (all four tasks, real shard schema) and its tokenizer."""

    out: str = "data/shapes"
    """output root"""
    num_train: int = 2000
    """training examples (texts) per task"""
    num_val: int = 500
    """validation examples per task"""
    num_test: int = 500
    """test examples per task"""
    seed: int = 0
    """seed of the scenes and texts"""
    tasks: str = ",".join(TASKS)
    """comma-separated subset of nlvr2,vqa2,snli_ve,retrieval"""
    image_size: int = 384
    """image side in pixels"""
    patch_size: int = 32
    """grid cell = ViT patch (32 for ViLT-B/32)"""
    object_cells: int = 1
    """object side in grid cells"""
    min_objects: int = 3
    """fewest objects in a scene"""
    max_objects: int = 6
    """most objects in a scene"""
    noise: float = 8.0
    """std of the background pixel noise"""
    types: str | None = None
    """restrict statement types, e.g. shape,color,exist"""
    image_format: Literal["jpg", "png"] = "jpg"
    """how images are encoded"""
    shard_size: int = 250
    """records per shard"""
    workers: int | None = None
    """processes (default: CPU count, at most 8)"""
    force: bool = False
    """regenerate even if the same data exist"""

    def __post_init__(self) -> None:
        spec = self.spec()
        for task in spec.tasks:
            if task not in TASKS:
                raise ValueError(f"--tasks: unknown task {task!r} (choose from {', '.join(TASKS)})")
            spec.task_types(task)
        if min(spec.num_train, spec.num_val, spec.num_test) < 0 or spec.shard_size < 1:
            raise ValueError("--num-* must be >= 0 and --shard-size >= 1")

    def spec(self) -> ShapesSpec:
        """The `ShapesSpec` the flags describe."""
        return ShapesSpec(
            seed=self.seed,
            num_train=self.num_train,
            num_val=self.num_val,
            num_test=self.num_test,
            tasks=tuple(t.strip() for t in self.tasks.split(",") if t.strip()),
            world=World.of(self),
            types=tuple(t.strip() for t in self.types.split(",")) if self.types else None,
            image_format=self.image_format,
            shard_size=self.shard_size,
        )


def run_shapes(args: ShapesArgs) -> int:
    """Generate the data the flags describe, unless ``--out`` already holds them."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = args.spec()
    if not args.force and is_current(args.out, spec):
        print(f"{args.out}: up to date (use --force to regenerate)")
        return 0
    start = time.perf_counter()
    generate(spec, args.out, workers=args.workers)
    elapsed = time.perf_counter() - start
    n = sum(spec.num(s) for s in SPLITS) * len(spec.tasks)
    print(f"wrote {n} examples ({', '.join(spec.tasks)}) to {args.out} in {elapsed:.1f}s")
    print(f"tokenizer: {Path(args.out) / 'tokenizer'}")
    return 0


COMMAND = Command(ShapesArgs, run_shapes, prog="python -m pumer_lightning.data.shapes")


def main(argv: list[str] | None = None) -> int:
    """``python -m pumer_lightning.data.shapes`` (``pumer shapes``)."""
    return COMMAND.main(argv)
