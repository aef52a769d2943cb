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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

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
    "bad_text": "a text (or its text_id) is not valid Unicode, e.g. a lone UTF-16 surrogate such as \\ud83d",
    "missing_label": "a text entry of a labelled split has no label",
    "bad_label": "a label is not in the label vocabulary or has the wrong type",
}


class SkipCounter:
    """Counts dropped examples by reason in one process and logs the events behind them.

    An *event* is one call of :meth:`skip`: a record with a bad image, a bad text entry, a whole shard that could
    not be read. The first ``log_limit`` events per reason are warnings naming the record key, the shard and the
    error, whatever the number of examples each one lost (a 0-byte shard losing 500 examples is one event, and
    the one most worth seeing); later events of that reason go to DEBUG, announced once by a warning. The counts
    (:attr:`total`) are examples.
    """

    def __init__(self, split: str, log_limit: int = 20):
        self.split = split
        self.log_limit = log_limit
        self.total: Counter = Counter()
        self.events: Counter = Counter()
        self._pending: Counter = Counter()
        #: While True, skips are neither counted nor logged: a resumed training stream replays (without decoding)
        #: the part of the epoch that was already consumed, whose skips were counted before the interruption.
        self.muted = False

    def skip(self, reason: str, key: str, shard: str, detail: str = "", n: int = 1) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        if self.muted:
            return
        self.total[reason] += n
        self._pending[reason] += n
        self.events[reason] += 1
        level = logging.WARNING if self.events[reason] <= self.log_limit else logging.DEBUG
        if log.isEnabledFor(level):
            suffix = f": {detail}" if detail else ""
            message = "[%s] skipped %d example(s), reason %s, key %s in %s%s"
            log.log(level, message, *(self.split, n, reason, key, shard, suffix))
        if self.events[reason] == self.log_limit:
            log.warning(
                "[%s] %d %s events logged in this process; further ones are logged at DEBUG level (logger %s), "
                "their examples still counted",
                *(self.split, self.log_limit, reason, log.name),
            )

    def take(self) -> dict[str, int]:
        """Counts since the last call (what still has to reach the main process)."""
        out = dict(self._pending)
        self._pending.clear()
        return out


# ---------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ShardClaim:
    """What ``meta.json`` says a shard holds. A claim to check against the shard, never a limit on reading."""

    records: int
    samples: int


_warned_counts: set[str] = set()


def warn_counts(path: str, records: int, samples: int, claim: ShardClaim | None, unknown: int = 0) -> None:
    """Warn (once per process and shard) when a fully read shard disagrees with its ``meta.json`` counts.

    ``samples`` counts the texts of readable records; ``unknown`` records (no readable ``.json``) hold at least
    one text each, which the claim includes. The warning gives what was read against what is listed: every record
    of the shard was read, so nothing is lost by the disagreement itself."""
    if claim is None or path in _warned_counts:
        return
    if records == claim.records and (
        samples == claim.samples if not unknown else samples + unknown <= claim.samples
    ):
        return
    _warned_counts.add(path)
    log.warning(
        "%s was read to its end: records / examples read %d / %d vs listed %d / %d in its meta.json entry; "
        "nothing is lost, the counts in meta.json are out of date (re-run the conversion to rewrite them)",
        *(path, records, samples, claim.records, claim.samples),
    )


def tar_end(path: str) -> tuple[bool, int]:
    """(whether the tar file ends with its end-of-archive marker, the offset where reading its headers stopped).

    Python's ``tarfile`` ends a read silently at a zero block (the marker), at the end of the file and at a
    header it cannot parse after the first one; only the first is a complete file. So a shard that yields fewer
    records than ``meta.json`` lists is out of date (the marker is there) or cut short (it is not).
    """
    try:
        with tarfile.open(path, "r:") as tar:
            for _ in tar:
                pass
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            block = f.read(512)
    except (OSError, tarfile.TarError, EOFError):
        return False, 0
    return len(block) == 512 and block == bytes(512), end


def _texts_of(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, str]:
    """Parse the ``.json`` member of a raw record: (info, None, "") or (None, skip reason, detail)."""
    payload = raw.get("json")
    if payload is None:
        return None, "missing_json", "the record has no .json member"
    try:
        info = json.loads(payload)
        if not isinstance(info, dict):
            raise TypeError(f"the .json member is a {type(info).__name__}, not an object")
        texts = info["texts"]
        if not isinstance(texts, list):
            raise TypeError("'texts' is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        return None, "bad_json", f"{type(exc).__name__}: {exc}"
    return info, None, ""


def read_shard(
    path: str,
    counter: SkipCounter,
    claim: ShardClaim | int | None = None,
    report: bool = True,
    images_only: bool = False,
):
    """Yield the raw WebDataset samples of one shard, every record of it, whatever ``meta.json`` claims.

    Each yielded record carries its parsed ``.json`` member (``"__info__"``) or why it has none (``"__bad__"``).
    With ``report`` (the one slot that owns the shard), the losses the record parser cannot count are counted
    here once the shard is read: a read error (``shard_error``) and records whose ``.json`` member is missing or
    unreadable (``missing_json``/``bad_json``). Their texts are unknown, so the examples they lost are taken from
    ``claim`` (the shard's ``meta.json`` counts): the claimed examples that the readable records do not account
    for, at least one per lost record. A shard whose fully read content disagrees with ``claim`` is reported
    with a warning naming the file.
    """
    if isinstance(claim, int):
        claim = ShardClaim(claim, claim)
    errors: list[BaseException] = []
    records = texts = 0
    last_key = "(none)"
    unknown: list[tuple[str, str, str]] = []  # (reason, key, detail) of records whose texts are unknown

    def handler(exn: BaseException) -> bool:
        errors.append(exn)
        return True

    name = os.path.basename(path)
    try:
        with open(path, "rb") as stream:
            source = [{"url": path, "stream": stream}]
            for raw in group_by_keys(tar_file_expander(source, handler=handler), handler=handler):
                records += 1
                last_key = raw.get("__key__", last_key)
                info, reason, detail = _texts_of(raw)
                if info is None:
                    raw["__bad__"] = (reason, detail)
                    unknown.append((reason, last_key, detail))  # type: ignore[arg-type]
                else:
                    raw["__info__"] = info
                    texts += len(info["texts"])
                yield raw
    except OSError as exc:
        errors.append(exc)
    if not report:
        return
    if images_only:  # one example per record: every loss is known exactly
        known, claimed = records - len(unknown), (claim.records if claim is not None else None)
    else:
        known, claimed = texts, (claim.samples if claim is not None else None)
    deficit = (claimed - known) if claimed is not None else 0
    what = f"{type(errors[0]).__name__}: {errors[0]}" if errors else ""
    if not errors and claim is not None and records < claim.records:
        complete, end = tar_end(path)
        if not complete:
            what = f"the tar ends without its end-of-archive marker (cut short at byte {end})"
    if what:
        lost = max(1, deficit - len(unknown))
        listed = "" if claim is None else f" vs {claim.records} listed in meta.json"
        detail = f"{what}; records read {records}{listed}"
        counter.skip("shard_error", f"after {last_key}", name, detail, n=lost)
        extra = 0
    else:
        warn_counts(path, records, texts, claim, len(unknown))
        extra = max(0, deficit - len(unknown))
    for i, (reason, key, detail) in enumerate(unknown):
        n = 1 + extra // len(unknown) + (1 if i < extra % len(unknown) else 0)
        note = f" ({n} example(s) lost per the shard's meta.json count)" if n > 1 else ""
        counter.skip(reason, key, name, detail + note, n=n)


def _image_member(raw: dict[str, Any], index: int) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        data = raw.get(f"img{index}.{ext}")
        if data is not None:
            return data
    return None


def unicode_problem(value: str) -> str | None:
    """Why ``value`` cannot be encoded as UTF-8 (a lone surrogate, from a JSON escape like ``\\ud83d``), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{exc.reason} {value[exc.start : exc.end]!r} at position {exc.start}"
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
            if isinstance(value, str) and value in ("True", "False"):
                return int(value == "True")
            raise ValueError(f"NLVR2 label must be true/false, got {value!r}")
        if self.task == "snli_ve":
            if not isinstance(value, str) or value not in self.index:
                raise ValueError(f"SNLI-VE label {value!r} is not one of {', '.join(SNLI_VE_LABELS)}")
            return self.index[value]
        if self.task == "vqa2":
            if not isinstance(value, dict):
                raise ValueError(f"VQA label must be an {{answer: score}} object, got {type(value).__name__}")
            indices, scores = [], []
            for answer, score in value.items():
                if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
                    raise ValueError(f"VQA score of {answer!r} must be in [0, 1], got {score!r}")
                if answer in self.index:  # answers outside the vocabulary are dropped, as PuMer does
                    indices.append(self.index[answer])
                    scores.append(float(score))
            return indices, scores
        return None

    def __call__(self, raw: dict[str, Any], counter: SkipCounter) -> list[Example]:
        key = raw.get("__key__", "?")
        shard = os.path.basename(raw.get("__url__", "?"))
        if "__bad__" in raw:
            return []  # counted by read_shard, which knows how many examples the shard lost with it
        info = raw.get("__info__")
        if info is None:
            info, reason, detail = _texts_of(raw)
            if info is None:  # a record that did not come through read_shard: its texts are unknown
                counter.skip(reason, key, shard, detail)  # type: ignore[arg-type]
                return []
        texts = info["texts"]
        n_lost = 1 if self.images_only else len(texts)
        if n_lost == 0:
            return []
        images = [_image_member(raw, i) for i in range(self.n_images)]
        if any(img is None for img in images):
            missing = [f"img{i}" for i, img in enumerate(images) if img is None]
            counter.skip("missing_image", key, shard, f"no {', '.join(missing)} member", n=n_lost)
            return []
        image_index = info.get("image_index")
        if self.task == "retrieval" and (isinstance(image_index, bool) or not isinstance(image_index, int)):
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
            problem = unicode_problem(text) or unicode_problem(text_id)
            if problem is not None:
                counter.skip("bad_text", ascii(text_id), shard, f"record {key}, text entry {j}: {problem}")
                continue
            label = None
            if self.labeled:
                if "label" not in entry:
                    counter.skip("missing_label", text_id, shard, f"record {key}, text entry {j}")
                    continue
                try:
                    label = self.label(entry["label"])
                except (ValueError, TypeError) as exc:
                    counter.skip("bad_label", text_id, shard, f"record {key}, text entry {j}: {exc}")
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
    claim: ShardClaim  # what meta.json says the shard holds
    offset: int  # global index of the shard's first record (from the claims: only balances the record split)

    @property
    def records(self) -> int:
        return self.claim.records


class NoUsableData(RuntimeError):
    """No shard of a training split yields a single usable example."""


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
        # Every listed shard is read, whatever meta.json says it holds: its counts are a claim, not a limit.
        refs, offset = [], 0
        for s in meta.shards:
            refs.append(_ShardRef(str(Path(split_dir) / s.name), ShardClaim(s.records, s.samples), offset))
            offset += max(0, s.records)
        if not refs:
            raise ValueError(f"{split_dir}: meta.json lists no shard")
        self.shards = refs
        self.split_dir = str(split_dir)
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

    def owned(self, order: list[int], slot: int, n_slots: int) -> set[int]:
        """Shards whose losses this slot reports (each shard is reported by exactly one slot)."""
        if self.whole_shards(n_slots):
            return set(order[slot::n_slots])
        return {i for pos, i in enumerate(order) if pos % n_slots == slot}

    def records(
        self, order: list[int], slot: int, n_slots: int, counter: SkipCounter, everything: bool = False
    ) -> Iterator[dict]:
        """Raw records of this slot, visiting shards in ``order``.

        ``everything``: read every record of every shard (a training slot whose own share holds no usable
        example); losses are still reported only for the shards this slot owns.
        """
        images_only = self.parser.images_only
        if everything:
            own = self.owned(order, slot, n_slots)
            for i in order:
                ref = self.shards[i]
                yield from read_shard(ref.path, counter, ref.claim, report=i in own, images_only=images_only)
            return
        if self.whole_shards(n_slots):
            for i in order[slot::n_slots]:
                ref = self.shards[i]
                yield from read_shard(ref.path, counter, ref.claim, images_only=images_only)
            return
        for pos, i in enumerate(order):
            ref = self.shards[i]
            owner = pos % n_slots == slot
            shard_records = read_shard(ref.path, counter, ref.claim, report=owner, images_only=images_only)
            for j, raw in enumerate(shard_records):
                if (ref.offset + j) % n_slots == slot:
                    yield raw

    def emit(self, batch: list[Example], counter: SkipCounter) -> dict[str, Any]:
        out = self.collator(batch)
        pending = counter.take()
        if pending:
            out["_skipped"] = pending
        return out


@dataclass
class _SlotHealth:
    """Whether a training slot still finds usable examples (shared by its example and batch generators)."""

    everything: bool = False  # reading every shard because its own share held nothing usable
    pass_size: int = 0  # most examples parsed in one pass
    fails_since_ok: int = 0  # consecutive examples whose images did not decode
    dead: bool = False  # so many consecutive decode failures that no usable example is left


class TrainStream(_StreamBase):
    """Endless, shuffled training stream of collated batches (see the module docstring).

    Each worker's stream is a function of ``(seed, epoch, rank, worker)``: batch ``k`` of a worker holds the
    examples it pulls from its shuffle buffer up to that point, the images it could not decode replaced by the
    next examples. Every batch carries ``"_pos"`` = (worker, examples pulled so far), which :class:`StreamLoader`
    turns into a resumable position: a worker restarted mid-epoch replays its stream up to that point without
    decoding a single image (and without counting its skips twice), then goes on.

    A slot (rank, worker) whose own shards hold no usable example (say its only shard is corrupt) reads every
    shard of the split instead and goes on; only when no shard of the split holds a usable example does the
    stream stop, with one message naming the split directory.

    Args:
        shuffle_buffer: examples held for shuffling in each worker (0 disables).
        **kwargs: see :class:`_StreamBase`.
    """

    def __init__(self, *, shuffle_buffer: int = 1000, **kwargs: Any):
        super().__init__(**kwargs)
        self.shuffle_buffer = shuffle_buffer
        # The epoch is shared with worker processes (persistent workers keep their dataset copy).
        self.epoch = multiprocessing.Value("q", 0, lock=False)
        # Where a resumed epoch starts: [epoch or -1, batches consumed, pulls of worker 0, 1, ...]; set by
        # StreamLoader.configure_workers before workers start iterating.
        self.resume = multiprocessing.Array("q", [-1, 0, 0], lock=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.value = int(epoch)

    def set_resume(self, epoch: int, batches: int, pulls: list[int]) -> None:
        """Make the next pass over ``epoch`` continue after ``batches`` consumed batches, worker ``v`` having
        pulled ``pulls[v]`` examples (``epoch=-1``: start from the beginning)."""
        if len(pulls) + 2 > len(self.resume):
            self.resume = multiprocessing.Array("q", [-1, 0] + [0] * len(pulls), lock=False)
        self.resume[0], self.resume[1] = int(epoch), int(batches)
        for v in range(len(self.resume) - 2):
            self.resume[2 + v] = int(pulls[v]) if v < len(pulls) else 0

    def examples(
        self, epoch: int, slot: int, n_slots: int, counter: SkipCounter, health: _SlotHealth | None = None
    ) -> Iterator[Example]:
        health = health if health is not None else _SlotHealth()
        for p in itertools.count():
            order = list(range(len(self.shards)))
            random.Random(f"{self.seed}/{epoch}/{p}/shards").shuffle(order)  # same on every rank
            produced = 0
            for raw in self.records(order, slot, n_slots, counter, everything=health.everything):
                exs = self.parser(raw, counter)
                produced += len(exs)
                yield from exs
            health.pass_size = max(health.pass_size, produced)
            if produced and not health.dead:
                continue
            if health.everything:
                raise NoUsableData(
                    f"[{self.name}] no usable example in any of the {len(self.shards)} shard(s) of "
                    f"{self.split_dir}: training cannot start; skipped so far: {dict(counter.total)} (reasons: "
                    "pumer_lightning.data.SKIP_REASONS)"
                )
            log.warning(
                "[%s] slot %d of %d found no usable example in its own shard(s) of %s (skipped so far: %s); it "
                "reads every shard of the split instead", self.name, slot, n_slots, self.split_dir,
                dict(counter.total),
            )  # fmt: skip
            health.everything, health.dead, health.fails_since_ok = True, False, 0

    def _start(self, epoch: int, worker: int, num_workers: int) -> tuple[int, int]:
        """(worker whose stream this worker continues, examples it already pulled) for a resumed epoch."""
        if self.resume[0] != epoch or len(self.resume) < 2 + num_workers:
            return worker, 0
        v = (worker + self.resume[1]) % num_workers  # the DataLoader asks workers round-robin from worker 0
        return v, int(self.resume[2 + v])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch = int(self.epoch.value)
        worker, start = self._start(epoch, worker, num_workers)
        slot, n_slots = self.rank * num_workers + worker, self.world_size * num_workers
        counter = SkipCounter(self.name)
        health = _SlotHealth()
        tag = f"{self.seed}/{epoch}/{slot}/rank{self.rank}"
        stream = shuffled(self.examples(epoch, slot, n_slots, counter, health), self.shuffle_buffer,
                          random.Random(tag))  # fmt: skip
        pulls = 0
        batch: list[Example] = []
        try:
            if start:  # replay the consumed part of the epoch: no decoding, its skips were counted already
                counter.muted = True
                for _ in stream:
                    pulls += 1
                    if pulls >= start:
                        break
                counter.muted = False
            for ex in stream:
                pulls += 1
                # one generator per example, so that a resumed stream augments exactly as an uninterrupted one
                rng = random.Random(f"{tag}/{pulls}") if self.transform.augment is not None else None
                tensors = decode_example_images(ex, self.transform, counter, rng)
                if tensors is None:
                    health.fails_since_ok += 1
                    if (
                        health.pass_size
                        and health.fails_since_ok > self.shuffle_buffer + 2 * health.pass_size
                    ):
                        health.dead = True  # a full pass and more without one decodable image
                    continue
                health.fails_since_ok = 0
                ex.images = tensors
                batch.append(ex)
                if len(batch) == self.batch_size:
                    out = self.emit(batch, counter)
                    out["_pos"] = (worker, pulls)
                    yield out
                    batch = []
        except NoUsableData as exc:
            yield {"_fatal": str(exc)}


class EvalStream(_StreamBase):
    """One exact pass over a split; each record decoded once and shared by all its texts."""

    def expected_batches(self, num_workers: int) -> int | None:
        """Batches this rank yields if no example is dropped; None when slots do not get whole shards.

        Counted from what the shards hold (:func:`count_shard`, reading tar headers and ``.json`` members only),
        not from ``meta.json``, so a stale ``meta.json`` can never make the trainer stop before the data ends.
        """
        workers = max(1, num_workers)
        n_slots = self.world_size * workers
        if not self.whole_shards(n_slots):
            return None
        total = 0
        for w in range(workers):
            slot = self.rank * workers + w
            n = 0
            for i in range(slot, len(self.shards), n_slots):
                ref = self.shards[i]
                records, samples = count_shard(ref.path, ref.claim)
                n += records if self.parser.images_only else samples
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


_count_cache: dict[tuple[str, int, int], tuple[int, int]] = {}


def count_shard(path: str, claim: ShardClaim | None = None) -> tuple[int, int]:
    """(records with a readable ``.json`` member, texts in them) of a shard, as far as it can be read.

    Reads tar headers and the small ``.json`` members only (image bytes are skipped), so it is cheap next to
    decoding; results are cached per file (path, size, mtime). A missing file counts (0, 0). When the shard reads
    to its end and disagrees with ``claim``, a warning names the file.
    """
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _count_cache:
        return _count_cache[key]
    all_records, records, texts, current = 0, 0, 0, None
    complete = True
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None:
                    continue
                if prefix != current:
                    current = prefix
                    all_records += 1
                if suffix.lower() != "json":
                    continue
                f = tar.extractfile(member)
                try:
                    info = json.loads(f.read()) if f is not None else None
                    n = (
                        len(info["texts"])
                        if isinstance(info, dict) and isinstance(info["texts"], list)
                        else None
                    )
                except (ValueError, KeyError, TypeError):
                    n = None
                if n is not None:
                    records += 1
                    texts += n
    except (OSError, tarfile.TarError, EOFError):
        complete = False
    if complete and claim is not None and all_records < claim.records:
        complete = tar_end(path)[0]  # fewer records than listed: out of date, or cut short
    if complete:
        warn_counts(path, all_records, texts, claim, all_records - records)
    _count_cache[key] = (records, texts)
    return records, texts


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

    A training loader is resumable mid-epoch: :meth:`state_dict` records the epoch, how many of its batches were
    consumed and where each worker's stream stood after its last consumed batch; after :meth:`load_state_dict`
    the next pass over that epoch yields only the batches that are left, continuing every worker's stream
    where it stopped, so each example of the epoch is seen once. Lightning saves and restores this state with
    the fit loop (the loader is ``Stateful``).

    Args:
        dataset: the stream.
        num_workers, persistent_workers, pin_memory, prefetch_factor: as for ``DataLoader``.
        num_batches: for training, the exact number of batches per epoch (the loader stops there; ``len()``
            returns it). For evaluation leave it None.
        epoch_fn: returns the current epoch (the trainer's); when it returns None, the loader counts epochs
            itself. Passed to the stream before workers start an epoch.
        on_skipped: receives ``{reason: count}`` deltas as they arrive.
        postprocess: applied to each batch in the main process before it is yielded.
        consumed_fn: returns how many batches of the current epoch the consumer has finished with (the trainer's
            progress), or None; default: the batches yielded so far (a consumer that prefetches has finished
            with fewer).
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
        consumed_fn: Callable[[], int | None] | None = None,
    ):
        if isinstance(dataset, TrainStream) and num_batches is None:
            raise ValueError("a training stream is endless: num_batches must be given")
        # Not named ``dataset``: Lightning would warn that an IterableDataset's length may be wrong, but this
        # length is exact by construction (training) or computed from the shards themselves (evaluation).
        self.stream = dataset
        self.num_workers = num_workers
        self.num_batches = num_batches
        self.epoch_fn = epoch_fn
        self.on_skipped = on_skipped
        self.postprocess = postprocess
        self.consumed_fn = consumed_fn
        self._epochs_started = 0
        # resumable position (training): epoch in progress, batches yielded in it, and per yielded batch
        # (number in the epoch, worker, examples that worker had pulled, skip counts that came with it)
        self._epoch: int | None = None
        self._first = 0  # batches of the epoch consumed before this pass started (a resumed epoch)
        self._yielded = 0
        self._start_pulls: list[int] = []
        self._trail: list[tuple[int, int, int, dict[str, int]]] = []
        self._resume: dict[str, Any] | None = None
        if isinstance(dataset, TrainStream):
            # sized before any worker starts: workers share this array with the main process
            dataset.set_resume(-1, 0, [0] * max(1, num_workers))
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

    # ------------------------------------------------------------------------------------------ resumable state
    def _layout(self) -> dict[str, int]:
        stream = self.stream
        return {"workers": max(1, self.num_workers), "rank": stream.rank, "world_size": stream.world_size,
                "batch_size": stream.batch_size, "num_batches": int(self.num_batches or 0)}  # fmt: skip

    def _consumed(self) -> int:
        """Batches of the current epoch the consumer has finished with (at least those of a resumed start)."""
        consumed = self.consumed_fn() if self.consumed_fn is not None else None
        if consumed is None:
            return self._yielded
        return max(min(int(consumed), self._yielded), self._first)

    def unconsumed_skips(self) -> dict[str, int]:
        """Skip counts that arrived with batches yielded but not yet consumed (already passed to ``on_skipped``);
        a stream resumed from :meth:`state_dict` counts them again."""
        if self._epoch is None:
            return {}
        consumed = self._consumed()
        out: Counter = Counter()
        for number, _, _, skipped in self._trail:
            if number > consumed:
                out.update(skipped)
        return dict(out)

    def _own_state(self) -> dict[str, Any]:
        """This rank's position: the epoch, batches consumed, and where each worker's stream stood after them."""
        if not isinstance(self.stream, TrainStream) or self._epoch is None:
            return dict(self._resume or {})
        consumed = self._consumed()
        pulls = list(self._start_pulls)
        for number, worker, pos, _ in self._trail:
            if number <= consumed:
                pulls[worker] = pos
        positions: list[dict[str, Any] | None] = [None] * self.stream.world_size
        positions[self.stream.rank] = {"epoch": self._epoch, "batches": consumed, "pulls": pulls}
        state = {"epoch": self._epoch, "batches": consumed, "pulls": pulls, **self._layout()}
        return {**state, "positions": positions}

    def state_dict(self) -> dict[str, Any]:
        """Where the training epoch stands on every rank: ``{}`` for an evaluation loader or before the first epoch.

        ``positions[r]`` is rank ``r``'s position. Under ``torch.distributed`` every rank must call this (Lightning
        does: a checkpoint is dumped on every rank, then written by rank 0): the ranks' positions are gathered,
        since a rank whose images failed to decode has pulled more examples than its batches hold.
        """
        if not isinstance(self.stream, TrainStream):
            return {}
        return merge_rank_states(gather_per_rank(self._own_state(), self.stream.world_size))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the epoch of ``state_dict`` where it stopped, the next time the loader runs that epoch."""
        self._resume = dict(state_dict) if state_dict else None

    def _resumed_epoch(self) -> int | None:
        """The epoch a loaded state continues: its own when it stopped inside it, else the next one.

        Taken from the state rather than from ``epoch_fn``, so that the continued epoch does not depend on when
        the caller (a trainer restoring its loops, or a script without one) updates its own epoch count.
        """
        state = self._resume
        if not state or "epoch" not in state:
            return None
        done = int(state.get("batches", 0)) >= int(state.get("num_batches") or self.num_batches or 0)
        return int(state["epoch"]) + (1 if done else 0)

    def _resume_position(self, epoch: int) -> tuple[int, list[int]]:
        """(batches already consumed, pulls per worker) for a pass over ``epoch``; (0, zeros) to start afresh."""
        workers = max(1, self.num_workers)
        fresh = (0, [0] * workers)
        state, self._resume = self._resume, None
        if not state or state.get("epoch") != epoch:
            return fresh
        layout = self._layout()
        own = rank_position(state, layout["rank"], layout["world_size"])
        batches = int((own or state).get("batches", 0))
        if not 0 < batches < (self.num_batches or 0):
            return fresh
        same = all(state.get(k) == layout[k] for k in ("workers", "world_size", "batch_size", "num_batches"))
        if not same:
            log.warning(
                "[%s] the checkpoint's loader layout %s differs from this run's %s: the rest of epoch %d (%d of %d "
                "batches) is drawn from the start of the epoch's stream, so some of its examples repeat",
                *(self.stream.name, {k: state.get(k) for k in layout}, layout, epoch),
                *(self.num_batches - batches, self.num_batches),
            )
            return batches, [-1] * workers
        if own is not None:
            pulls = [int(p) for p in own.get("pulls", [])][:workers]
        else:
            log.warning(
                "[%s] the checkpoint holds no stream position for rank %d (only rank %s's, as written before "
                "positions were saved per rank): this rank continues epoch %d as if no image had failed to decode "
                "in its first %d batches; if some did, a few of its examples repeat and as many are left out",
                *(self.stream.name, layout["rank"], state.get("rank"), epoch, batches),
            )
            bs = self.stream.batch_size
            pulls = [(batches // workers + (1 if v < batches % workers else 0)) * bs for v in range(workers)]
        return batches, pulls + [0] * (workers - len(pulls))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = 0
        if isinstance(self.stream, TrainStream):
            epoch = self._resumed_epoch()
            if epoch is None:
                epoch = self.epoch_fn() if self.epoch_fn is not None else None
                epoch = self._epochs_started if epoch is None else epoch
            self._epochs_started = epoch
            n, pulls = self._resume_position(epoch)
            self.stream.set_epoch(epoch)
            if n and pulls[0] >= 0:
                self.stream.set_resume(epoch, n, pulls)
                log.info(
                    "[%s] resuming epoch %d after batch %d of %d",
                    self.stream.name,
                    epoch,
                    n,
                    self.num_batches,
                )
            else:
                self.stream.set_resume(-1, 0, [0] * len(pulls))
            self._epoch, self._first, self._yielded, self._trail = epoch, n, n, []
            self._start_pulls = [max(0, p) for p in pulls]
        self._epochs_started += 1
        if self.num_batches == 0:
            return
        if self.num_batches is not None and n >= self.num_batches:
            return
        since_last: Counter = Counter()
        for batch in self.loader:
            fatal = batch.get("_fatal")
            if fatal is not None:
                raise RuntimeError(fatal)
            skipped = batch.pop("_skipped", None)
            if skipped:
                since_last.update(skipped)
                if self.on_skipped is not None:
                    self.on_skipped(skipped)
            pos = batch.pop("_pos", None)
            if batch.pop("_empty", False):
                continue
            n += 1
            if pos is not None:
                self._yielded = n
                self._trail.append((n, pos[0], pos[1], dict(since_last)))
                since_last = Counter()
            yield batch if self.postprocess is None else self.postprocess(batch)
            if self.num_batches is not None and n >= self.num_batches:
                return


# ---------------------------------------------------------------------------------------------- per-rank state
def gather_per_rank(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, in rank order, when ``torch.distributed`` runs ``world_size`` ranks (a collective:
    every rank must call it); else ``[obj]`` (one process, or ranks simulated in one process)."""
    dist = torch.distributed
    if (
        world_size > 1
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() == world_size
    ):
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One training-loader state holding the ``positions`` of every rank, from the states of the ranks' loaders.

    The first non-empty state gives the epoch and layout; every other must agree with it (a ValueError says
    where not). A rank without a position keeps ``None``, which :func:`rank_position` reports.
    """
    states = [s for s in states if s]
    if not states:
        return {}
    out = dict(states[0])
    if "positions" not in out:
        return out
    positions = list(out["positions"])
    for state in states[1:]:
        for key in ("epoch", "workers", "world_size", "batch_size", "num_batches"):
            if state.get(key) != out.get(key):
                raise ValueError(
                    f"loader states of rank {out.get('rank')} and rank {state.get('rank')} differ in {key!r}: "
                    f"{out.get(key)!r} vs {state.get(key)!r}"
                )
        for r, position in enumerate(state.get("positions") or []):
            if position is not None:
                positions[r] = position
    out["positions"] = positions
    return out


def rank_position(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """Rank ``rank``'s saved position in a loader state, or None when the state lacks it (a state written before
    positions were saved per rank, or by another number of ranks)."""
    positions = state.get("positions") or []
    if state.get("world_size") == world_size and len(positions) == world_size:
        position = positions[rank]
        if position is not None and position.get("epoch", state.get("epoch")) == state.get("epoch"):
            return position
    if "positions" not in state and state.get("rank") == rank:
        return {"batches": state.get("batches", 0), "pulls": state.get("pulls", [])}
    return None


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
    skipped: dict[str, int] = field(default_factory=dict)  # captions left out, by reason (SKIP_REASONS)

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
    """Read only the ``.json`` members of a retrieval split (seeking over the image bytes).

    Captions that cannot be scored (no text, a text that is not valid Unicode, a record whose ``.json`` is bad)
    are left out, logged and counted in ``skipped``.
    """
    text_ids, texts, pairs, images = [], [], [], set()
    counter = SkipCounter(f"{meta.task}/{meta.split} captions")
    for s in meta.shards:
        path = Path(split_dir) / s.name
        before = len(texts) + sum(counter.total.values())  # captions accounted for before this shard
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile() or not member.name.endswith(".json"):
                        continue
                    key = member.name[: -len(".json")]
                    f = tar.extractfile(member)
                    try:
                        info = json.loads(f.read()) if f is not None else None
                        image_index = info["image_index"]
                        if isinstance(image_index, bool) or not isinstance(image_index, int):
                            raise TypeError(f"image_index {image_index!r} is not an integer")
                        entries = info["texts"]
                        if not isinstance(entries, list):
                            raise TypeError("'texts' is not a list")
                    except (ValueError, KeyError, TypeError) as exc:
                        n = (
                            len(info["texts"])
                            if isinstance(info, dict) and isinstance(info.get("texts"), list)
                            else 1
                        )
                        counter.skip(
                            "bad_json", key, path.name, f"its captions are left out ({exc})", n=max(1, n)
                        )
                        continue
                    images.add(image_index)
                    for j, entry in enumerate(entries):
                        text_id = (
                            str(entry.get("text_id", f"{key}-{j}"))
                            if isinstance(entry, dict)
                            else f"{key}-{j}"
                        )
                        text = entry.get("text") if isinstance(entry, dict) else None
                        if not isinstance(text, str) or not text.strip():
                            counter.skip("missing_text", text_id, path.name, f"record {key}, text entry {j}")
                            continue
                        problem = unicode_problem(text) or unicode_problem(text_id)
                        if problem is not None:
                            counter.skip("bad_text", ascii(text_id), path.name, f"record {key}: {problem}")
                            continue
                        text_ids.append(text_id)
                        texts.append(text)
                        pairs.append(image_index)
        except (OSError, tarfile.TarError) as exc:
            seen = len(texts) + sum(counter.total.values()) - before
            counter.skip("shard_error", "(captions)", path.name, f"could not be read to its end ({exc})",
                         n=max(1, s.samples - seen))  # fmt: skip
    return RetrievalTexts(
        text_ids=text_ids,
        texts=texts,
        image_ids=torch.tensor(pairs, dtype=torch.long),
        all_image_ids=torch.tensor(sorted(images), dtype=torch.long),
        collator=collator,
        skipped=dict(counter.total),
    )
