"""The two datasets: :class:`TrainStream` (endless, shuffled, resumable) and :class:`EvalStream` (one exact pass).

Both split the shards over (rank, worker) *slots* (see the package docstring) and yield collated batches with
their skip counts attached (``"_skipped"``).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from ..collate import Collator, Example
from ..schema import SplitMeta
from ..transforms import ImageTransform
from .records import RecordParser, decode_example_images
from .shards import ShardClaim, count_shard, read_shard
from .skips import SkipCounter

log = logging.getLogger("pumer_lightning.data")


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
                "reads every shard of the split instead",
                *(self.name, slot, n_slots, self.split_dir, dict(counter.total)),
            )
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
        examples = self.examples(epoch, slot, n_slots, counter, health)
        stream = shuffled(examples, self.shuffle_buffer, random.Random(tag))
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
