"""Streaming shards into batches: splitting over ranks and workers, skip-and-count, equal epochs.

Two datasets share the reading code:

- :class:`TrainStream` is endless. Every pass over the shards uses a shard order drawn from ``(seed, epoch,
  pass)``, identical on every rank, then each (rank, worker) *slot* takes its share. The loader stops each
  epoch after exactly ``num_samples // (batch_size * world_size)`` batches, counted in the main process, so every
  rank runs the same number of steps whatever the shard sizes (uneven shards would otherwise hang DDP).
- :class:`EvalStream` makes one pass; every record goes to exactly one slot, so each example is seen exactly
  once across ranks and workers, and the last batch of each worker may be short.

Slots get whole shards when there are at least as many shards as slots (``world_size * num_workers``);
otherwise every slot reads all shards and keeps the records whose global index falls on it, which is slower
but still exact.

Bad data never stops a run. Each dropped example is counted by reason (:data:`SKIP_REASONS`) and logged with
its record key and shard; the counts travel to the main process inside the batches (``"_skipped"``) where
:class:`StreamLoader` hands them to a callback (the DataModule's ``skipped`` counter).
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .collate import Collator, Example
from .schema import IMAGE_EXTENSIONS, SNLI_VE_LABELS, SplitMeta, images_per_record
from .transforms import ImageTransform, decode_image

log = logging.getLogger("pumer_lightning.data")

#: Why an example can be dropped. ``shard_error`` counts unreadable or truncated shards (one per shard read).
SKIP_REASONS: dict[str, str] = {
    "shard_error": "the tar shard could not be read to its end (truncated, missing or not a tar)",
    "missing_json": "the record has no .json member",
    "bad_json": "the .json member is not valid JSON or lacks required fields",
    "missing_image": "an image member (img0/img1) is absent",
    "decode_error": "an image could not be decoded",
    "truncated_image": "an image file is truncated",
    "missing_text": "a text entry has no (or an empty) text",
    "missing_label": "a text entry of a labelled split has no label",
    "bad_label": "a label is not in the label vocabulary or has the wrong type",
}


class SkipCounter:
    """Counts dropped examples by reason in one process and logs them (the first ``log_limit`` per reason)."""

    def __init__(self, split: str, log_limit: int = 20):
        self.split = split
        self.log_limit = log_limit
        self.total: Counter = Counter()
        self._pending: Counter = Counter()

    def skip(self, reason: str, key: str, shard: str, detail: str = "", n: int = 1) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.total[reason] += n
        self._pending[reason] += n
        level = logging.WARNING if self.total[reason] <= self.log_limit else logging.DEBUG
        if log.isEnabledFor(level):
            suffix = f": {detail}" if detail else ""
            log.log(level, "[%s] skipped %d example(s), reason %s, key %s in %s%s",
                    self.split, n, reason, key, shard, suffix)  # fmt: skip

    def take(self) -> dict[str, int]:
        """Counts since the last call (what still has to reach the main process)."""
        out = dict(self._pending)
        self._pending.clear()
        return out


# ---------------------------------------------------------------------------------------------- reading
def read_shard(path: str, counter: SkipCounter, expected_records: int | None = None, report: bool = True):
    """Yield the raw WebDataset samples of one shard; read errors end the shard and are counted once."""
    errors: list[BaseException] = []
    seen = 0
    last_key = "(none)"

    def handler(exn: BaseException) -> bool:
        errors.append(exn)
        return True

    name = os.path.basename(path)
    try:
        with open(path, "rb") as stream:
            source = [{"url": path, "stream": stream}]
            for raw in group_by_keys(tar_file_expander(source, handler=handler), handler=handler):
                seen += 1
                last_key = raw.get("__key__", last_key)
                yield raw
    except OSError as exc:
        errors.append(exc)
    if not report:
        return
    if errors:
        counter.skip("shard_error", f"after {last_key}", name, f"{type(errors[0]).__name__}: {errors[0]}")
    elif expected_records is not None and seen < expected_records:
        counter.skip("shard_error", f"after {last_key}", name,
                     f"holds {seen} records, meta.json says {expected_records}")  # fmt: skip


def _image_member(raw: dict[str, Any], index: int) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        data = raw.get(f"img{index}.{ext}")
        if data is not None:
            return data
    return None


class RecordParser:
    """Validate a raw record and expand it into examples (images still encoded).

    Args:
        task: the task of the split.
        labeled: whether text entries must carry a label.
        labels: label vocabulary from ``meta.json`` (answers for VQA).
        images_only: yield one text-less example per record (retrieval evaluation over images).
    """

    def __init__(self, task: str, labeled: bool, labels: list[str] | None, images_only: bool = False):
        self.task = task
        self.labeled = labeled and task != "retrieval" and not images_only
        self.images_only = images_only
        self.n_images = images_per_record(task)
        vocab = labels if task == "vqa2" else (SNLI_VE_LABELS if task == "snli_ve" else None)
        self.index = {name: i for i, name in enumerate(vocab or ())}

    def label(self, value: Any) -> Any:
        """Convert a stored label to what the collate function expects; raise ValueError if it is bad."""
        if self.task == "nlvr2":
            if isinstance(value, bool):
                return int(value)
            if value in ("True", "False"):
                return int(value == "True")
            raise ValueError(f"NLVR2 label must be true/false, got {value!r}")
        if self.task == "snli_ve":
            if value not in self.index:
                raise ValueError(f"SNLI-VE label {value!r} is not one of {', '.join(SNLI_VE_LABELS)}")
            return self.index[value]
        if self.task == "vqa2":
            if not isinstance(value, dict):
                raise ValueError(f"VQA label must be an {{answer: score}} object, got {type(value).__name__}")
            indices, scores = [], []
            for answer, score in value.items():
                if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
                    raise ValueError(f"VQA score of {answer!r} must be in [0, 1], got {score!r}")
                if answer in self.index:  # answers outside the vocabulary are dropped, as PuMer does
                    indices.append(self.index[answer])
                    scores.append(float(score))
            return indices, scores
        return None

    def __call__(self, raw: dict[str, Any], counter: SkipCounter) -> list[Example]:
        key = raw.get("__key__", "?")
        shard = os.path.basename(raw.get("__url__", "?"))
        payload = raw.get("json")
        if payload is None:
            counter.skip("missing_json", key, shard)
            return []
        try:
            info = json.loads(payload)
            texts = info["texts"]
            if not isinstance(texts, list):
                raise TypeError("'texts' is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            counter.skip("bad_json", key, shard, f"{type(exc).__name__}: {exc}")
            return []
        n_lost = 1 if self.images_only else max(1, len(texts))
        images = [_image_member(raw, i) for i in range(self.n_images)]
        if any(img is None for img in images):
            missing = [f"img{i}" for i, img in enumerate(images) if img is None]
            counter.skip("missing_image", key, shard, f"no {', '.join(missing)} member", n=n_lost)
            return []
        image_index = info.get("image_index")
        if self.task == "retrieval" and not isinstance(image_index, int):
            counter.skip("bad_json", key, shard, "retrieval record lacks an integer 'image_index'", n=n_lost)
            return []
        record_meta = {k: v for k, v in info.items() if k != "texts"}
        record_meta.setdefault("image_id", key)
        base = {"record_key": key, "shard": shard, **record_meta}
        if self.images_only:
            return [Example(key, key, shard, images, None, None, image_index, base)]
        out = []
        for j, entry in enumerate(texts):
            text_id = str(entry.get("text_id", f"{key}-{j}")) if isinstance(entry, dict) else f"{key}-{j}"
            text = entry.get("text") if isinstance(entry, dict) else None
            if not isinstance(text, str) or not text.strip():
                counter.skip("missing_text", text_id, shard, f"record {key}, text entry {j}")
                continue
            label = None
            if self.labeled:
                if "label" not in entry:
                    counter.skip("missing_label", text_id, shard, f"record {key}, text entry {j}")
                    continue
                try:
                    label = self.label(entry["label"])
                except ValueError as exc:
                    counter.skip("bad_label", text_id, shard, str(exc))
                    continue
            extra = {k: v for k, v in entry.items() if k not in ("text", "label", "answers", "text_id")}
            meta = {**base, "text_id": text_id, "text": text, **extra}
            out.append(Example(text_id, key, shard, images, text, label, image_index, meta))
        return out


def decode_example_images(
    ex: Example, transform: ImageTransform, counter: SkipCounter, rng: random.Random | None, n: int = 1
) -> list[torch.Tensor] | None:
    """Decode and transform the images of ``ex``; on failure count ``n`` skipped examples and return None."""
    tensors = []
    for i, data in enumerate(ex.images):
        try:
            tensors.append(transform(decode_image(data), rng))
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ... on bad files
            reason = "truncated_image" if "truncat" in str(exc).lower() else "decode_error"
            counter.skip(reason, ex.record_key, ex.shard, f"img{i}: {type(exc).__name__}: {exc}", n=n)
            return None
    return tensors


# ---------------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class _ShardRef:
    path: str
    records: int
    offset: int  # global index of the shard's first record


class _StreamBase(IterableDataset):
    def __init__(
        self,
        *,
        split_dir: str | Path,
        meta: SplitMeta,
        parser: RecordParser,
        transform: ImageTransform,
        collator: Collator,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        name: str = "",
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        refs, offset = [], 0
        for s in meta.shards:
            if s.records > 0:
                refs.append(_ShardRef(str(Path(split_dir) / s.name), s.records, offset))
                offset += s.records
        if not refs:
            raise ValueError(f"{split_dir}: meta.json lists no non-empty shard")
        self.shards = refs
        self.meta = meta
        self.parser = parser
        self.transform = transform
        self.collator = collator
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.name = name or f"{meta.task}/{meta.split}"

    def slot(self) -> tuple[int, int]:
        """(slot, number of slots) of the calling worker: ``rank * num_workers + worker_id``."""
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * num_workers + worker, self.world_size * num_workers

    def whole_shards(self, n_slots: int) -> bool:
        return len(self.shards) >= n_slots

    def records(self, order: list[int], slot: int, n_slots: int, counter: SkipCounter) -> Iterator[dict]:
        """Raw records of this slot, visiting shards in ``order``."""
        if self.whole_shards(n_slots):
            for i in order[slot::n_slots]:
                ref = self.shards[i]
                yield from read_shard(ref.path, counter, ref.records)
            return
        for pos, i in enumerate(order):
            ref = self.shards[i]
            owner = pos % n_slots == slot
            for j, raw in enumerate(read_shard(ref.path, counter, ref.records, report=owner)):
                if (ref.offset + j) % n_slots == slot:
                    yield raw

    def emit(self, batch: list[Example], counter: SkipCounter) -> dict[str, Any]:
        out = self.collator(batch)
        pending = counter.take()
        if pending:
            out["_skipped"] = pending
        return out


class TrainStream(_StreamBase):
    """Endless, shuffled training stream of collated batches (see the module docstring).

    Args:
        shuffle_buffer: examples held for shuffling in each worker (0 disables).
        **kwargs: see :class:`_StreamBase`.
    """

    def __init__(self, *, shuffle_buffer: int = 1000, **kwargs: Any):
        super().__init__(**kwargs)
        self.shuffle_buffer = shuffle_buffer
        # The epoch is shared with worker processes (persistent workers keep their dataset copy).
        self.epoch = multiprocessing.Value("q", 0, lock=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.value = int(epoch)

    def examples(self, epoch: int, slot: int, n_slots: int, counter: SkipCounter) -> Iterator[Example]:
        for p in itertools.count():
            order = list(range(len(self.shards)))
            random.Random(f"{self.seed}/{epoch}/{p}/shards").shuffle(order)  # same on every rank
            produced = 0
            for raw in self.records(order, slot, n_slots, counter):
                exs = self.parser(raw, counter)
                produced += len(exs)
                yield from exs
            if produced == 0:
                raise RuntimeError(
                    f"[{self.name}] slot {slot} of {n_slots} found no usable example in a full pass over "
                    f"its shards ({len(self.shards)} in {os.path.dirname(self.shards[0].path)}); "
                    f"skipped so far: {dict(counter.total)}"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, n_slots = self.slot()
        epoch = int(self.epoch.value)
        counter = SkipCounter(self.name)
        rng = random.Random(f"{self.seed}/{epoch}/{slot}/rank{self.rank}")
        stream = shuffled(self.examples(epoch, slot, n_slots, counter), self.shuffle_buffer, rng)
        batch: list[Example] = []
        for ex in stream:
            tensors = decode_example_images(ex, self.transform, counter, rng)
            if tensors is None:
                continue
            ex.images = tensors
            batch.append(ex)
            if len(batch) == self.batch_size:
                yield self.emit(batch, counter)
                batch = []


class EvalStream(_StreamBase):
    """One exact pass over a split; each record decoded once and shared by all its texts."""

    def expected_batches(self, num_workers: int) -> int | None:
        """Batches this rank yields if no example is dropped; None when slots do not get whole shards."""
        workers = max(1, num_workers)
        n_slots = self.world_size * workers
        if not self.whole_shards(n_slots):
            return None
        samples_per_shard = {Path(s.name).name: s.samples for s in self.meta.shards}
        total = 0
        for w in range(workers):
            slot = self.rank * workers + w
            if self.parser.images_only:
                n = sum(self.shards[i].records for i in range(slot, len(self.shards), n_slots))
            else:
                n = sum(
                    samples_per_shard[os.path.basename(self.shards[i].path)]
                    for i in range(slot, len(self.shards), n_slots)
                )
            total += -(-n // self.batch_size)
        return total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, n_slots = self.slot()
        counter = SkipCounter(self.name)
        batch: list[Example] = []
        for raw in self.records(list(range(len(self.shards))), slot, n_slots, counter):
            exs = self.parser(raw, counter)
            if not exs:
                continue
            tensors = decode_example_images(exs[0], self.transform, counter, None, n=len(exs))
            if tensors is None:
                continue
            for ex in exs:
                ex.images = tensors
                batch.append(ex)
                if len(batch) == self.batch_size:
                    yield self.emit(batch, counter)
                    batch = []
        if batch:
            yield self.emit(batch, counter)
        pending = counter.take()
        if pending:
            yield {"_skipped": pending, "_empty": True}


def shuffled(items: Iterator[Example], size: int, rng: random.Random) -> Iterator[Example]:
    """Buffer shuffle: fill a buffer of ``size`` items, then emit a random one for each item that comes in.

    The buffer holds examples whose images are still encoded, so it is cheap to fill before the first batch.
    """
    if size <= 1:
        yield from items
        return
    buf: list[Example] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


# ---------------------------------------------------------------------------------------------- loader
def _identity(batch: Any) -> Any:
    return batch


class StreamLoader:
    """Iterable over collated batches from a :class:`TrainStream` or :class:`EvalStream`.

    Wraps a ``torch.utils.data.DataLoader`` (``batch_size=None``: workers already yield batches), strips the
    skip counts off every batch and passes them to ``on_skipped``.

    Args:
        dataset: the stream.
        num_workers, persistent_workers, pin_memory, prefetch_factor: as for ``DataLoader``.
        num_batches: for training, the exact number of batches per epoch (the loader stops there; ``len()``
            returns it). For evaluation leave it None.
        epoch_fn: returns the current epoch (the trainer's); when it returns None, the loader counts epochs
            itself. Passed to the stream before workers start an epoch.
        on_skipped: receives ``{reason: count}`` deltas as they arrive.
        postprocess: applied to each batch in the main process before it is yielded.
    """

    def __init__(
        self,
        dataset: TrainStream | EvalStream,
        *,
        num_workers: int = 0,
        num_batches: int | None = None,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        epoch_fn: Callable[[], int | None] | None = None,
        on_skipped: Callable[[dict[str, int]], None] | None = None,
        multiprocessing_context: str | None = None,
        postprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        if isinstance(dataset, TrainStream) and num_batches is None:
            raise ValueError("a training stream is endless: num_batches must be given")
        # Not named ``dataset``: Lightning would warn that an IterableDataset's length may be wrong, but this
        # length is exact by construction (training) or computed from the shard assignment (evaluation).
        self.stream = dataset
        self.num_workers = num_workers
        self.num_batches = num_batches
        self.epoch_fn = epoch_fn
        self.on_skipped = on_skipped
        self.postprocess = postprocess
        self._epochs_started = 0
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs["persistent_workers"] = persistent_workers
            kwargs["prefetch_factor"] = prefetch_factor or 2
            kwargs["multiprocessing_context"] = multiprocessing_context
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_identity,
            pin_memory=pin_memory,
            **kwargs,
        )
        self._expected = None if num_batches is not None else dataset.expected_batches(num_workers)

    def __len__(self) -> int:
        if self.num_batches is not None:
            return self.num_batches
        if self._expected is None:
            raise TypeError("the number of evaluation batches is unknown (fewer shards than workers x ranks)")
        return self._expected

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if isinstance(self.stream, TrainStream):
            epoch = self.epoch_fn() if self.epoch_fn is not None else None
            self.stream.set_epoch(self._epochs_started if epoch is None else epoch)
        self._epochs_started += 1
        n = 0
        if self.num_batches == 0:
            return
        for batch in self.loader:
            skipped = batch.pop("_skipped", None)
            if skipped and self.on_skipped is not None:
                self.on_skipped(skipped)
            if batch.pop("_empty", False):
                continue
            yield batch if self.postprocess is None else self.postprocess(batch)
            n += 1
            if self.num_batches is not None and n >= self.num_batches:
                return


# ---------------------------------------------------------------------------------------------- retrieval texts
@dataclass
class RetrievalTexts:
    """Every caption of a retrieval split with its pairing, for the N_img x N_text score matrix.

    ``image_ids[i]`` is the integer image id of caption ``i``; ``all_image_ids`` lists every image of the split
    (sorted), i.e. the rows of the matrix. Images streamed by the evaluation loader carry the same ids
    (``batch["image_ids"]``).
    """

    text_ids: list[str]
    texts: list[str]
    image_ids: torch.Tensor  # (N_text,) int64
    all_image_ids: torch.Tensor  # (N_img,) int64, sorted
    collator: Collator

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
        """Tokenised chunks: ``input_ids``, ``attention_mask`` (padded per chunk), ``text_index`` (positions in
        this list), ``image_ids`` (paired image of each caption) and ``keys`` (caption ids)."""
        stop = len(self.texts) if stop is None else min(stop, len(self.texts))
        for i in range(start, stop, batch_size):
            j = min(i + batch_size, stop)
            out = self.collator.tokenize(self.texts[i:j])
            out["text_index"] = torch.arange(i, j)
            out["image_ids"] = self.image_ids[i:j]
            out["keys"] = self.text_ids[i:j]
            yield out


def scan_retrieval_texts(split_dir: str | Path, meta: SplitMeta, collator: Collator) -> RetrievalTexts:
    """Read only the ``.json`` members of a retrieval split (seeking over the image bytes)."""
    text_ids, texts, pairs, images = [], [], [], set()
    for s in meta.shards:
        path = Path(split_dir) / s.name
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile() or not member.name.endswith(".json"):
                        continue
                    key = member.name[: -len(".json")]
                    f = tar.extractfile(member)
                    try:
                        info = json.loads(f.read()) if f is not None else None
                        image_index = int(info["image_index"])
                        entries = info["texts"]
                    except (ValueError, KeyError, TypeError) as exc:
                        log.warning("retrieval texts: %s in %s has bad json (%s); its captions are left out",
                                    key, path.name, exc)  # fmt: skip
                        continue
                    images.add(image_index)
                    for j, entry in enumerate(entries):
                        text = entry.get("text") if isinstance(entry, dict) else None
                        if not isinstance(text, str) or not text.strip():
                            continue
                        text_ids.append(str(entry.get("text_id", f"{key}-{j}")))
                        texts.append(text)
                        pairs.append(image_index)
        except (OSError, tarfile.TarError) as exc:
            log.warning("retrieval texts: shard %s could not be read to its end (%s)", path, exc)
    return RetrievalTexts(
        text_ids=text_ids,
        texts=texts,
        image_ids=torch.tensor(pairs, dtype=torch.long),
        all_image_ids=torch.tensor(sorted(images), dtype=torch.long),
        collator=collator,
    )
