"""`DataFacts`: what a task module knows of its data, read from the data module once, when a trainer sets it up.

A task needs a few facts of the data it runs on: which task the shards hold (checked against the model), the
label names (the VQA answer vocabulary, NLVR2's and SNLI-VE's class names) for its head and prediction files,
which split each stage reads, the `SkipLedger` that counts the examples dropped, and for retrieval the captions of
a split and a pass over its images. `DataFacts.of` reads them from a data module's public attributes (any object
with some of them works; a missing one is left empty), and the task keeps them: no step reaches into the data
module through the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stream import RetrievalTexts, SkipLedger

#: The data module's attribute naming the split each evaluation stage reads.
STAGE_SPLITS = {"val": "val_split", "test": "test_split", "predict": "predict_split"}


@dataclass(frozen=True)
class DataFacts:
    """The data a task module runs on, as far as the task needs to know (module doc).

    Attributes:
        task: the task the shards hold (``data.task``), None when unknown.
        label_names: class names (index = class id) or the VQA answer list; None for retrieval or when unknown.
        splits: the split each evaluation stage reads: ``{"val": ..., "test": ..., "predict": ...}``.
        skip_ledger: the account of dropped examples (`SkipLedger`), None without one.
        tokenizer_dir: the tokenizer the texts were tokenized with.
        image_mean, image_std: the pixels' normalisation (0..1 units), to draw them again.
        texts_of: a split's retrieval captions (`VLDataModule.retrieval_texts`).
        loader_of: an exact pass over a split (`VLDataModule.eval_dataloader`).
    """

    task: str | None = None
    label_names: tuple[str, ...] | None = None
    splits: Mapping[str, str | None] = field(default_factory=dict)
    skip_ledger: SkipLedger | None = None
    tokenizer_dir: Path | None = None
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    texts_of: Callable[[str], RetrievalTexts] | None = None
    loader_of: Callable[[str], Iterable[dict[str, Any]]] | None = None

    @classmethod
    def of(cls, datamodule: Any) -> DataFacts:
        """The facts of ``datamodule`` (a `VLDataModule`, or anything with some of its attributes; None: none)."""
        if datamodule is None:
            return cls()
        names = getattr(datamodule, "label_names", None)
        transform = getattr(datamodule, "eval_transform", None)
        tokenizer = getattr(datamodule, "tokenizer_dir", None)
        return cls(
            task=getattr(datamodule, "task", None),
            label_names=tuple(names) if names else None,
            splits={stage: getattr(datamodule, attr, None) for stage, attr in STAGE_SPLITS.items()},
            skip_ledger=getattr(datamodule, "skip_ledger", None),
            tokenizer_dir=Path(tokenizer) if tokenizer is not None else None,
            image_mean=tuple(getattr(transform, "mean", cls.image_mean)),
            image_std=tuple(getattr(transform, "std", cls.image_std)),
            texts_of=getattr(datamodule, "retrieval_texts", None),
            loader_of=getattr(datamodule, "eval_dataloader", None),
        )

    def split(self, stage: str) -> str | None:
        """The split ``stage`` (``val``, ``test``, ``predict``) reads; None when it has none."""
        return self.splits.get(stage)

    def retrieval_texts(self, split: str) -> RetrievalTexts:
        """Every caption of retrieval split ``split``, with its image id."""
        if self.texts_of is None:
            raise ValueError(f"the data module gives no retrieval captions of {split} (a VLDataModule does)")
        return self.texts_of(split)

    def eval_loader(self, split: str) -> Iterable[dict[str, Any]]:
        """An exact, unshuffled pass over ``split``."""
        if self.loader_of is None:
            raise ValueError(f"the data module gives no evaluation loader of {split} (a VLDataModule does)")
        return self.loader_of(split)
