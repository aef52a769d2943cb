"""Writing splits as WebDataset shards: atomic shard files, resumable conversion, a closing summary.

Converters describe a split as an ordered list of :class:`RecordPlan` (key, json payload, image file paths:
metadata only, no pixels). :class:`SplitWriter` cuts the list into shards of ``shard_size`` records and writes
each shard by streaming its images from disk, so memory stays bounded by one shard whatever the dataset size.
A shard is first written to a hidden temporary file and renamed when complete; its fingerprint (a hash of its
plans and of each image file's size and modification time) is recorded, so a second run skips shards that are
already on disk with the same content (resume after a crash, or an idempotent re-run) and rewrites only what
changed, including shards whose images were repaired. Every image is decoded once while writing: a truncated or
undecodable file is reported in the summary and never written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from .schema import (
    META_FILE,
    PROGRESS_FILE,
    ShardInfo,
    SplitMeta,
    check_key,
    image_member,
    shard_name,
    write_json_atomic,
    write_split_meta,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")


def encode_record(key: str, info: dict[str, Any], images: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
    """The WebDataset sample dict of one record: ``{"__key__", "json", "img0.<ext>", ...}``."""
    sample: dict[str, Any] = {"__key__": check_key(key), "json": json.dumps(info).encode("utf-8")}
    for i, (ext, data) in enumerate(images):
        sample[image_member(ext, i)] = bytes(data)
    return sample


def write_shard(path: str | Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write encoded samples to ``path`` atomically; returns the number written.

    The tar is written next to its destination under a hidden name and renamed at the end, so an interrupted
    run never leaves a truncated shard under the final name. ``mtime`` is fixed, so equal content gives equal
    bytes.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    n = 0
    try:
        with wds.TarWriter(str(tmp), encoder=False, mtime=0.0) as sink:
            for sample in samples:
                sink.write(sample)
                n += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def sniff_image(data: bytes, full: bool = False) -> str:
    """Return the file extension for encoded image bytes; raise if not an image.

    ``full``: decode every pixel, as the loader will (a truncated or corrupt file raises here, not in a run).
    """
    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "").lower()
        if full:
            img.load()
    return {"jpeg": "jpg", "mpo": "jpg", "tiff": "tif"}.get(fmt, fmt or "bin")


class SkipRecord(Exception):
    """Raised by a record loader to drop one record; ``reason`` feeds the closing summary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class RecordPlan:
    """What a record will hold, before any image is read."""

    key: str
    info: dict[str, Any]
    image_paths: list[Path]

    @property
    def num_texts(self) -> int:
        return len(self.info.get("texts", ()))


def load_plan_images(plan: RecordPlan) -> dict[str, Any]:
    """Read the image files of a plan and encode the record; missing, non-image, truncated or undecodable files
    raise SkipRecord (every image is decoded once, so a shard never holds an image the loader would skip)."""
    images = []
    for path in plan.image_paths:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise SkipRecord("missing_image", str(path)) from None
        except OSError as exc:
            raise SkipRecord("unreadable_image", f"{path} ({exc})") from None
        try:
            ext = sniff_image(data, full=True)
        except Exception as exc:  # PIL raises several types for non-images
            reason = "truncated_image" if "truncat" in str(exc).lower() else "unreadable_image"
            raise SkipRecord(reason, f"{path} ({type(exc).__name__}: {exc})") from None
        images.append((ext, data))
    return encode_record(plan.key, plan.info, images)


def bounded_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R | BaseException]:
    """Ordered ``map`` over a thread pool that keeps at most ``4 * workers`` results in flight.

    Exceptions are returned in place of results so the caller can count them and go on.
    """

    def safe(item: _T) -> _R | BaseException:
        try:
            return fn(item)
        except Exception as exc:
            return exc

    if workers <= 1:
        for item in items:
            yield safe(item)
        return
    window = 4 * workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(safe, item))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def _file_state(path: Path) -> list[int] | None:
    """(size, mtime in ns) of an image file, or None when it is missing: what a repaired image changes."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(plans: Sequence[RecordPlan]) -> str:
    """Hash of a shard's planned content: keys, json payloads, image paths and each image file's size and
    modification time, so a shard is rebuilt when an image is repaired, replaced or appears."""
    h = hashlib.sha1()
    for p in plans:
        files = [[str(x), _file_state(Path(x))] for x in p.image_paths]
        h.update(json.dumps([p.key, p.info, files], sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass
class SplitSummary:
    """What a conversion did: shards written/reused, records and examples kept, what was skipped and why."""

    split: str
    out_dir: Path
    shards_written: int = 0
    shards_reused: int = 0
    records: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples_of_skipped: dict[str, list[str]] = field(default_factory=dict)

    def note_skip(self, reason: str, detail: str, n: int = 1, keep: int = 5) -> None:
        self.skipped[reason] += n
        shown = self.examples_of_skipped.setdefault(reason, [])
        if len(shown) < keep:
            shown.append(detail)

    def lines(self) -> list[str]:
        out = [
            f"[{self.split}] {self.records} records, {self.samples} examples in "
            f"{self.shards_written + self.shards_reused} shards ({self.shards_written} written, "
            f"{self.shards_reused} already up to date) -> {self.out_dir}"
        ]
        for reason, n in sorted(self.skipped.items()):
            out.append(
                f"  skipped {n} ({reason}), e.g. {'; '.join(self.examples_of_skipped.get(reason, []))}"
            )
        return out


class SplitWriter:
    """Write one split from record plans, resumably.

    Args:
        out_dir: the split directory (``<root>/<split>``), created if needed.
        task, dataset, split: recorded in ``meta.json``; ``task`` and ``split`` also name the shard files.
        labeled: whether text entries carry labels.
        labels: label vocabulary stored in ``meta.json``.
        shard_size: records per shard.
        overwrite: rewrite every shard even if an identical one exists.
        created_by, extra: provenance stored in ``meta.json``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        task: str,
        dataset: str,
        split: str,
        labeled: bool,
        labels: list[str] | None,
        shard_size: int = 1000,
        overwrite: bool = False,
        created_by: str = "",
        extra: dict[str, Any] | None = None,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.task, self.dataset, self.split = task, dataset, split
        self.labeled, self.labels = labeled, labels
        self.shard_size = shard_size
        self.overwrite = overwrite
        self.created_by = created_by
        self.extra = dict(extra or {})

    def _previous(self) -> dict[str, ShardInfo]:
        """Shards of an earlier (complete or interrupted) run, by file name."""
        done: dict[str, ShardInfo] = {}
        if self.overwrite:
            return done
        for name in (META_FILE, PROGRESS_FILE):
            path = self.out_dir / name
            if not path.is_file():
                continue
            try:
                shards = json.loads(path.read_text()).get("shards", [])
                for s in shards:
                    info = ShardInfo(**s)
                    done[info.name] = info
            except (json.JSONDecodeError, TypeError, AttributeError):
                log.warning("ignoring unreadable %s", path)
        return done

    def write(
        self,
        plans: Sequence[RecordPlan],
        *,
        load: Callable[[RecordPlan], dict[str, Any]] = load_plan_images,
        workers: int = 8,
        progress: bool = True,
    ) -> tuple[SplitMeta, SplitSummary]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        previous = self._previous()
        summary = SplitSummary(split=self.split, out_dir=self.out_dir)
        shards: list[ShardInfo] = []
        chunks = [plans[i : i + self.shard_size] for i in range(0, len(plans), self.shard_size)]
        bar = tqdm(
            total=len(plans),
            desc=f"{self.dataset}/{self.split}",
            unit="rec",
            disable=not progress,
            leave=True,
        )
        for index, chunk in enumerate(chunks):
            name = shard_name(self.task, self.split, index)
            fp = _fingerprint(chunk)
            old = previous.get(name)
            if old is not None and old.fingerprint == fp and (self.out_dir / name).is_file():
                shards.append(old)
                summary.shards_reused += 1
                for reason, n in old.skipped.items():
                    summary.note_skip(reason, f"(in {name}, see its earlier run)", n)
                bar.update(len(chunk))
                continue
            shards.append(self._write_chunk(name, chunk, fp, load, workers, bar, summary))
            summary.shards_written += 1
            write_json_atomic(self.out_dir / PROGRESS_FILE, {"shards": [vars(s) for s in shards]})
        bar.close()
        self._remove_stale_shards({s.name for s in shards})
        return self._finish(shards, summary)

    def _write_chunk(
        self,
        name: str,
        chunk: Sequence[RecordPlan],
        fingerprint: str,
        load: Callable[[RecordPlan], dict[str, Any]],
        workers: int,
        bar: tqdm,
        summary: SplitSummary,
    ) -> ShardInfo:
        """Load ``chunk``'s records on ``workers`` threads and write the ones that load as shard ``name``."""
        skipped: Counter = Counter()
        kept_keys: set[str] = set()

        def samples() -> Iterator[dict]:
            for plan, result in zip(chunk, bounded_map(load, chunk, workers)):
                bar.update(1)
                if isinstance(result, SkipRecord):
                    skipped[result.reason] += 1
                    summary.note_skip(result.reason, result.detail)
                    continue
                if isinstance(result, BaseException):
                    skipped["error"] += 1
                    summary.note_skip("error", f"{plan.key}: {type(result).__name__}: {result}")
                    continue
                kept_keys.add(result["__key__"])
                yield result

        write_shard(self.out_dir / name, samples())
        kept = [p for p in chunk if p.key in kept_keys]
        return ShardInfo(
            name=name,
            records=len(kept),
            samples=sum(p.num_texts for p in kept),
            fingerprint=fingerprint,
            skipped=dict(skipped),
        )

    def _remove_stale_shards(self, keep_names: set[str]) -> None:
        """Shards of an earlier run with a larger plan would otherwise be picked up by nothing but disk space."""
        for stale in self.out_dir.glob(f"{self.task}-{self.split}-*.tar"):
            if stale.name not in keep_names:
                stale.unlink()

    def _finish(self, shards: list[ShardInfo], summary: SplitSummary) -> tuple[SplitMeta, SplitSummary]:
        """Write the split's meta.json over the progress file; the summary gets the split's totals."""
        meta = SplitMeta.from_shards(
            task=self.task,
            split=self.split,
            dataset=self.dataset,
            shards=shards,
            labeled=self.labeled,
            labels=self.labels,
            created_by=self.created_by,
            extra=self.extra,
        )
        write_split_meta(self.out_dir, meta)
        (self.out_dir / PROGRESS_FILE).unlink(missing_ok=True)
        summary.records = meta.num_records
        summary.samples = meta.num_samples
        return meta, summary
