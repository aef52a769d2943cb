"""``VLDataModule``: one LightningDataModule for the four PuMer tasks, real or synthetic, streamed from shards."""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from .collate import Collator, load_tokenizer
from .schema import NLVR2_LABELS, SNLI_VE_LABELS, SplitMeta, check_task, images_per_record, read_split_meta
from .stream import (
    EvalStream,
    RecordParser,
    RetrievalTexts,
    SkipLedger,
    StreamLoader,
    TrainStream,
    scan_retrieval_texts,
)
from .transforms import HALF, ImageTransform, RandAugment

log = logging.getLogger("pumer_lightning.data")


def _dist_info(trainer: pl.Trainer | None) -> tuple[int, int]:
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class VLDataModule(pl.LightningDataModule):
    """Vision-language data for NLVR2, VQAv2, SNLI-VE and image-text retrieval, streamed from WebDataset shards.

    ``data_dir`` holds one directory per split (``train/``, ``val/``, ``test/``), each with ``*.tar`` shards and a
    ``meta.json`` (see :mod:`pumer_lightning.data.schema`). Training batches are shuffled and every rank gets
    exactly :attr:`steps_per_epoch` of them; validation and test see every example exactly once across ranks and
    workers. Corrupt examples are dropped and counted in :attr:`skip_ledger` (totals: :attr:`skipped`).

    For ``task="retrieval"``, training batches pair each caption with its image (``image_ids`` tells which
    examples share an image); validation/test loaders yield *images only* (``pixel_values``, ``image_ids``) and
    :meth:`retrieval_texts` gives every caption of the split with its paired image id, so a task can fill the
    N_img x N_text score matrix chunk by chunk.

    Args:
        task: which task the shards hold; checked against each split's ``meta.json``.
        data_dir: dataset root holding the split directories, e.g. ``data/shapes/nlvr2`` or ``data/vqa2``.
        tokenizer: local tokenizer directory, loaded with ``transformers.AutoTokenizer.from_pretrained``.
        max_text_len: texts are truncated to this many tokens (special tokens included).
        text_padding: ``longest`` pads each batch to its longest text; ``max_length`` always pads to
            ``max_text_len`` (static shapes, so a compiled or graph-captured model never recompiles per batch; the
            official PuMer padding, which the ``pads_first`` text-merge policy is defined against).
        image_size: output side for square resizes, shorter side for ``shorter_side``.
        image_mean: per-channel mean in 0..1 pixel units (CLIP's for METER, 0.5 for ViLT).
        image_std: per-channel std in 0..1 pixel units.
        resize: ``square_bicubic`` (CLIP/METER), ``square_bilinear`` (PuMer's ViLT) or ``shorter_side``
            (original ViLT: aspect kept, longer side <= 1333/800 x image_size, sides floored to
            ``pad_multiple``; batches get a ``pixel_mask``).
        batch_size: training batch size per rank.
        eval_batch_size: validation/test/predict batch size per rank (default: ``batch_size``).
        num_workers: loader worker processes per rank.
        shuffle_buffer: examples each training worker holds for shuffling (0 disables shuffling within shards).
        randaugment: apply RandAugment(n=2, m=9) to training images.
        seed: seed of the shard order, the shuffle buffers and the augmentation; identical on every rank.
        train_split: split directory (or list of directories, concatenated) used for training.
        val_split: split used for validation; None disables validation.
        test_split: split used by ``trainer.test``; None disables it.
        predict_split: split used by ``trainer.predict`` (default: ``test_split``).
        persistent_workers: keep loader workers alive between epochs.
        pin_memory: pin batches in page-locked memory (for GPU training).
        pad_multiple: with ``resize="shorter_side"``, image sides are multiples of this (the patch size).
        uint8_transfer: workers send raw uint8 pixels (4x less inter-process and host-to-device traffic).
            The loaders a trainer requests through ``train/val/test/predict_dataloader`` keep them uint8 and
            :meth:`on_after_batch_transfer` normalises them to float32 on the training device; every other
            loader (no trainer attached, or :meth:`eval_dataloader` called by hand) normalises in the main
            process. Either way, model code sees float32 ``pixel_values``.
        worker_start_method: how loader workers start. Default: ``fork`` on Linux (workers start in
            milliseconds), the platform default elsewhere. Processes launched by ``spawn`` (Lightning's
            ``ddp_spawn``, ``torch.multiprocessing.spawn``) would otherwise start their workers with ``spawn``
            too, and every worker would re-import torch, Lightning and transformers.
    """

    def __init__(
        self,
        task: Literal["nlvr2", "vqa2", "snli_ve", "retrieval"],
        data_dir: str,
        tokenizer: str,
        max_text_len: int = 40,
        text_padding: Literal["longest", "max_length"] = "longest",
        image_size: int = 384,
        image_mean: tuple[float, float, float] = HALF,
        image_std: tuple[float, float, float] = HALF,
        resize: Literal["square_bicubic", "square_bilinear", "shorter_side"] = "square_bilinear",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        randaugment: bool = False,
        seed: int = 0,
        train_split: str | list[str] = "train",
        val_split: str | None = "val",
        test_split: str | None = "test",
        predict_split: str | None = None,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        pad_multiple: int = 32,
        uint8_transfer: bool = True,
        worker_start_method: Literal["fork", "spawn", "forkserver"] | None = None,
    ):
        super().__init__()
        check_task(task)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.save_hyperparameters()
        self.task = task
        self.data_dir = Path(data_dir)
        self.tokenizer_dir = Path(tokenizer)
        self.max_text_len = max_text_len
        self.text_padding = text_padding
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.train_splits = [train_split] if isinstance(train_split, str) else list(train_split)
        twice = sorted({s for s in self.train_splits if self.train_splits.count(s) > 1})
        if twice:
            raise ValueError(
                f"train_split lists {', '.join(map(repr, twice))} more than once ({self.train_splits}): its "
                "examples would be read twice per epoch; list each split once"
            )
        self.val_split = val_split
        self.test_split = test_split
        self.predict_split = predict_split or test_split
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.pad_multiple = pad_multiple
        if worker_start_method is None and sys.platform == "linux":
            worker_start_method = "fork"
        self.worker_start_method = worker_start_method
        augment = RandAugment(2, 9) if randaugment else None
        output = "uint8" if uint8_transfer else "float"
        mean, std = tuple(image_mean), tuple(image_std)
        self.eval_transform = ImageTransform(image_size, mean, std, resize, None, output, pad_multiple)  # type: ignore[arg-type]
        self.train_transform = ImageTransform(image_size, mean, std, resize, augment, output, pad_multiple)  # type: ignore[arg-type]
        self._metas: dict[str, SplitMeta] = {}
        self._retrieval_texts: dict[str, RetrievalTexts] = {}
        #: the one account of dropped examples (`SkipLedger`); never replaced, so a task module holding it stays current
        self.skip_ledger = SkipLedger()
        self._train_loader: StreamLoader | None = None
        self._loaders: weakref.WeakSet[StreamLoader] = weakref.WeakSet()  # every loader made, for teardown
        self._train_resume: dict[str, Any] | None = None  # from a checkpoint, for the next training loader

    # ------------------------------------------------------------------------------------------ metadata
    def split_meta(self, split: str) -> SplitMeta:
        """``meta.json`` of a split directory under ``data_dir`` (read once, checked against ``task``)."""
        if split not in self._metas:
            if not self.data_dir.is_dir():
                raise FileNotFoundError(
                    f"data_dir {self.data_dir} does not exist; create it with "
                    f"`python -m pumer_lightning.data.prepare <dataset> --out {self.data_dir}` or, for synthetic "
                    "data, `python -m pumer_lightning.data.shapes`"
                )
            meta = read_split_meta(self.data_dir / split)
            if meta.task != self.task:
                raise ValueError(
                    f"{self.data_dir / split / 'meta.json'} holds task {meta.task!r}, but task={self.task!r}"
                )
            self._check_labels(split, meta)
            self._metas[split] = meta
        return self._metas[split]

    def _check_labels(self, split: str, meta: SplitMeta) -> None:
        if self.task != "vqa2":
            return
        for other, known in self._metas.items():
            if known.labels != meta.labels:
                raise ValueError(
                    f"answer vocabularies differ between {self.data_dir / other / 'meta.json'} and "
                    f"{self.data_dir / split / 'meta.json'}; convert all VQAv2 splits in one prepare run"
                )

    def _train_meta(self) -> SplitMeta:
        metas = [self.split_meta(s) for s in self.train_splits]
        if len(metas) == 1:
            return metas[0]
        shards = []
        for split, meta in zip(self.train_splits, metas):
            for s in meta.shards:
                shards.append(type(s)(f"{split}/{s.name}", s.records, s.samples, s.fingerprint, s.skipped))
        merged = SplitMeta.from_shards(
            task=self.task,
            split="+".join(self.train_splits),
            dataset=metas[0].dataset,
            shards=shards,
            labeled=all(m.labeled for m in metas),
            labels=metas[0].labels,
        )
        return merged

    @property
    def label_names(self) -> list[str] | None:
        """Class names (NLVR2, SNLI-VE; index = class id), the answer list (VQAv2), None (retrieval)."""
        if self.task == "nlvr2":
            return list(NLVR2_LABELS)
        if self.task == "snli_ve":
            return list(SNLI_VE_LABELS)
        if self.task == "vqa2":
            return list(self._any_meta().labels or [])
        return None

    @property
    def num_labels(self) -> int:
        """Width of the classifier: 2 (NLVR2), 3 (SNLI-VE), the answer count (VQAv2), 0 (retrieval)."""
        names = self.label_names
        return len(names) if names is not None else 0

    @property
    def num_answers(self) -> int:
        """VQA answer vocabulary size (the width of ``labels``); 0 for other tasks."""
        return self.num_labels if self.task == "vqa2" else 0

    @property
    def n_images(self) -> int:
        """Images per example: 2 for NLVR2, else 1."""
        return images_per_record(self.task)

    def _any_meta(self) -> SplitMeta:
        for split in [*self.train_splits, self.val_split, self.test_split]:
            if split is not None and (self.data_dir / split / "meta.json").is_file():
                return self.split_meta(split)
        raise FileNotFoundError(f"no split of {self.data_dir} has a meta.json")

    @property
    def num_train_samples(self) -> int:
        """Training examples per epoch (texts; from the train split's ``meta.json``)."""
        return self._train_meta().num_samples

    def steps_per_epoch(self, world_size: int | None = None) -> int:
        """Training batches per rank per epoch: ``num_train_samples // (batch_size * world_size)``, at least 1.

        ``world_size`` defaults to the attached trainer's (1 without a trainer).
        """
        if world_size is None:
            world_size = _dist_info(self._trainer_or_none())[1]
        return max(1, self.num_train_samples // (self.batch_size * world_size))

    @property
    def skipped(self) -> dict[str, int]:
        """Examples dropped so far in this process, as ``{"<split>/<reason>": count}`` (`skip_ledger`'s totals).

        Reasons are listed in ``pumer_lightning.data.stream.SKIP_REASONS``. Counts arrive with the batches, so
        they cover what this rank has consumed; the task module reports them (docs/data.md#vldatamodule).
        """
        return self.skip_ledger.totals()

    @property
    def skipped_total(self) -> int:
        return sum(self.skip_ledger.totals().values())

    # ------------------------------------------------------------------------------------------ loaders
    def _trainer_or_none(self) -> pl.Trainer | None:
        return getattr(self, "trainer", None)

    def _collator(self, meta: SplitMeta) -> Collator:
        return Collator(
            self.task,
            self.tokenizer_dir,
            self.max_text_len,
            num_answers=len(meta.labels or []) if self.task == "vqa2" else 0,
            labeled=meta.labeled,
            pad_multiple=self.pad_multiple,
            text_padding=self.text_padding,
        )

    def _current_epoch(self) -> int | None:
        trainer = self._trainer_or_none()
        return int(trainer.current_epoch) if trainer is not None else None

    def _consumed_batches(self) -> int | None:
        """Training batches of the current epoch the trainer has finished (None outside ``fit``)."""
        trainer = self._trainer_or_none()
        if trainer is None or getattr(trainer.state, "fn", None) != "fit":
            return None
        try:
            return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        except AttributeError:
            return None

    def normalize_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Turn uint8 ``pixel_values`` into normalised float32 (no-op when they are float already)."""
        if isinstance(batch, dict) and "pixel_values" in batch:
            batch["pixel_values"] = self.eval_transform.normalize(batch["pixel_values"])
        return batch

    def _postprocess(self, for_trainer: bool) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        # Loaders that a trainer requested through the *_dataloader hooks leave uint8 pixels for
        # on_after_batch_transfer to normalise on the device; every other loader normalises itself.
        return None if for_trainer and self._trainer_or_none() is not None else self.normalize_batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.normalize_batch(batch)

    def setup(self, stage: str | None = None) -> None:
        """Read the metadata of the splits ``stage`` needs and check the tokenizer loads."""
        splits: list[str | None] = []
        if stage in (None, "fit"):
            splits += [*self.train_splits, self.val_split]
        if stage in (None, "validate"):
            splits.append(self.val_split)
        if stage in (None, "test"):
            splits.append(self.test_split)
        if stage in (None, "predict"):
            splits.append(self.predict_split)
        for split in splits:
            if split is not None:
                self.split_meta(split)
        load_tokenizer(self.tokenizer_dir)

    def train_dataloader(self) -> StreamLoader:
        """The training loader: exactly :meth:`steps_per_epoch` shuffled batches per epoch on every rank."""
        meta = self._train_meta()
        if meta.num_samples <= 0:
            where = self.data_dir / self.train_splits[0] if len(self.train_splits) == 1 else self.data_dir
            raise ValueError(
                f"{where}: meta.json lists no non-empty shard (num_samples {meta.num_samples}), so the length of a "
                "training epoch is unknown; re-run the conversion to rewrite meta.json"
            )
        rank, world = _dist_info(self._trainer_or_none())
        stream = TrainStream(
            split_dir=self.data_dir if len(self.train_splits) > 1 else self.data_dir / self.train_splits[0],
            meta=meta,
            parser=RecordParser(self.task, meta.labeled, meta.labels),
            transform=self.train_transform,
            collator=self._collator(meta),
            batch_size=self.batch_size,
            rank=rank,
            world_size=world,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            name=f"{self.task}/{meta.split}",
        )
        n_slots = world * max(1, self.num_workers)
        if len(stream.shards) < n_slots:
            log.warning(
                "%s/%s has %d shard(s) for %d rank x worker slots: every slot reads all shards and keeps its "
                "share of records. Write more shards (prepare --shard-size) for efficient loading.",
                *(self.data_dir, meta.split, len(stream.shards), n_slots),
            )
        loader = StreamLoader(
            stream,
            num_workers=self.num_workers,
            num_batches=self.steps_per_epoch(world),
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            epoch_fn=self._current_epoch,
            on_skipped=self.skip_ledger.recorder(meta.split),
            postprocess=self._postprocess(for_trainer=True),
            multiprocessing_context=self.worker_start_method,
            consumed_fn=self._consumed_batches,
        )
        if self._train_resume:
            loader.load_state_dict(self._train_resume)
            self._train_resume = None
        self._train_loader = loader
        self._loaders.add(loader)
        return loader

    def eval_dataloader(
        self, split: str, images_only: bool | None = None, batch_size: int | None = None
    ) -> StreamLoader:
        """An exact, unshuffled pass over ``split`` (any split directory under ``data_dir``).

        ``images_only`` (default: True for retrieval) yields one example per image with no text, for retrieval
        evaluation; pair it with :meth:`retrieval_texts`. ``batch_size`` defaults to ``eval_batch_size``. Batches
        always hold float32 ``pixel_values``, also when iterated by hand inside a LightningModule.
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"eval_dataloader: batch_size must be >= 1, got {batch_size}")
        return self._eval_loader(split, images_only, for_trainer=False, batch_size=batch_size)

    def _eval_loader(
        self, split: str, images_only: bool | None, for_trainer: bool, batch_size: int | None = None
    ) -> StreamLoader:
        meta = self.split_meta(split)
        if images_only is None:
            images_only = self.task == "retrieval"
        rank, world = _dist_info(self._trainer_or_none())
        stream = EvalStream(
            split_dir=self.data_dir / split,
            meta=meta,
            parser=RecordParser(self.task, meta.labeled, meta.labels, images_only=images_only),
            transform=self.eval_transform,
            collator=self._collator(meta),
            batch_size=batch_size or self.eval_batch_size,
            rank=rank,
            world_size=world,
            seed=self.seed,
            name=f"{self.task}/{split}",
        )
        loader = StreamLoader(
            stream,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            on_skipped=self.skip_ledger.recorder(split),
            postprocess=self._postprocess(for_trainer),
            multiprocessing_context=self.worker_start_method,
        )
        self._loaders.add(loader)
        return loader

    def teardown(self, stage: str) -> None:
        """Stop every loader's worker processes (Lightning calls this when a fit, validate, test or predict
        ends; call it after iterating :meth:`eval_dataloader` by hand). Persistent workers would otherwise
        live until garbage collection and then wait out a shutdown timeout."""
        for loader in list(self._loaders):
            loader.close()

    def val_dataloader(self) -> StreamLoader | list:
        return [] if self.val_split is None else self._eval_loader(self.val_split, None, for_trainer=True)

    def test_dataloader(self) -> StreamLoader | list:
        return [] if self.test_split is None else self._eval_loader(self.test_split, None, for_trainer=True)

    def predict_dataloader(self) -> StreamLoader | list:
        return (
            []
            if self.predict_split is None
            else self._eval_loader(self.predict_split, None, for_trainer=True)
        )

    # ------------------------------------------------------------------------------------------ retrieval
    def retrieval_texts(self, split: str | None = None) -> RetrievalTexts:
        """Every caption of a retrieval split with its paired image id (default split: ``val_split``).

        Use with :meth:`eval_dataloader` (images only): for each image batch, score it against
        ``texts.batches(chunk)`` and write rows ``image_ids`` of the N_img x N_text matrix; captions of image
        ``i`` are the columns where ``texts.image_ids == i``. Every rank gets all captions; images are split.
        """
        if self.task != "retrieval":
            raise ValueError(f"retrieval_texts() needs task='retrieval', not {self.task!r}")
        split = split or self.val_split
        if split is None:
            raise ValueError("retrieval_texts(): no split given and val_split is None")
        if split not in self._retrieval_texts:
            meta = self.split_meta(split)
            texts = scan_retrieval_texts(self.data_dir / split, meta, self._collator(meta))
            self.skip_ledger.add(split, texts.skipped)  # captions left out of every evaluation of the split
            self._retrieval_texts[split] = texts
        return self._retrieval_texts[split]

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Skip counts and where the training epoch stands, on every rank (Lightning saves this in checkpoints).

        ``train_stream`` lets a run resumed from a mid-epoch checkpoint continue the epoch where it stopped: it
        sees each remaining example of the epoch once and none of those already trained on, on every rank (each
        rank's stream position is saved). The skip counts cover the batches the trainer consumed (not those the
        loader had fetched ahead): ``skipped`` is this rank's, ``skipped_by_rank`` every rank's. Under
        ``torch.distributed`` every rank must call this (Lightning does): the ranks' states are gathered.
        """
        pending: dict[str, int] = {}
        train: dict[str, Any] = dict(self._train_resume or {})
        if self._train_loader is not None:
            split = self._train_meta().split
            pending = {f"{split}/{r}": n for r, n in self._train_loader.unconsumed_skips().items()}
            train = self._train_loader.state_dict() or train
        world = _dist_info(self._trainer_or_none())[1]
        return {**self.skip_ledger.state(world, pending), "train_stream": train}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world = _dist_info(self._trainer_or_none())
        self.skip_ledger.restore(state_dict, rank, world)
        train = state_dict.get("train_stream") or None
        self._train_resume = train
        if train and self._train_loader is not None:
            self._train_loader.load_state_dict(train)
            self._train_resume = None
