"""Examples and the collate function that turns a list of them into the batch dict every task consumes.

Batch keys (see docs/data.md):

- ``pixel_values`` float32 ``(B, n_images, 3, H, W)``; ``n_images`` is 2 for NLVR2, else 1.
- ``pixel_mask`` int64 ``(B, n_images, H, W)``: only with ``resize="shorter_side"``, where images differ in size
  and are padded bottom/right to the batch's largest (rounded up to 32 px).
- ``input_ids``, ``attention_mask`` int64 ``(B, L)``: right-padded to the longest text *of the batch*,
  truncated to ``max_text_len`` (special tokens included).
- ``labels``: int64 ``(B,)`` for NLVR2 (False 0, True 1) and SNLI-VE (contradiction 0, neutral 1, entailment 2);
  float32 ``(B, num_answers)`` VQA soft scores; absent for retrieval and for unlabelled splits.
- ``image_ids`` int64 ``(B,)``: retrieval only, the integer id of each example's image.
- ``keys`` list[str]: the example ids (NLVR2 identifier, VQA question id, SNLI-VE pair id, caption id).
- ``meta`` list[dict]: per example ``record_key``, ``shard``, ``image_id``, ``text_id``, ``text`` and the
  task's extra fields (``question_id``, ``answer_type``, ``statement_type``, ``image_index``, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .transforms import pad_to


@dataclass
class Example:
    """One text with its image(s), as it flows through the loader."""

    key: str
    record_key: str
    shard: str
    images: list[Any]  # encoded bytes before decoding, (3, H, W) tensors after
    text: str | None
    label: Any = None  # int (NLVR2, SNLI-VE); (indices, scores) (VQA); None
    image_index: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def load_tokenizer(path: str | Path):
    """Load a tokenizer from a local directory with ``AutoTokenizer`` (never from the hub)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory {path} does not exist (it must be a local directory; for the shapes world "
            "it is written by `python -m pumer_lightning.data.shapes`)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ValueError(f"tokenizer={str(path)!r} could not be loaded by AutoTokenizer: {exc}") from exc
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer={str(path)!r} has no pad token; batches are padded to the longest text")
    tok.padding_side = "right"
    return tok


class Collator:
    """Build a batch dict from examples; tokenises with a tokenizer loaded lazily in each worker process.

    Args:
        task: one of the four tasks.
        tokenizer: local tokenizer directory.
        max_text_len: truncation length in tokens, special tokens included.
        num_answers: size of the VQA soft-score vector.
        labeled: emit ``labels`` (False for unlabelled test splits).
        pad_multiple: ``shorter_side`` images are padded to a multiple of this (the patch size).
        text_padding: ``longest`` (pad to the batch's longest text) or ``max_length`` (always ``max_text_len``:
            static shapes for compiled / graph-captured inference, and the official code's padding).
    """

    def __init__(
        self,
        task: str,
        tokenizer: str | Path,
        max_text_len: int = 40,
        num_answers: int = 0,
        labeled: bool = True,
        pad_multiple: int = 32,
        text_padding: str = "longest",
    ):
        if max_text_len < 2:
            raise ValueError(f"max_text_len must be >= 2 (room for the special tokens), got {max_text_len}")
        self.task = task
        self.tokenizer_path = str(tokenizer)
        self.max_text_len = max_text_len
        self.num_answers = num_answers
        self.labeled = labeled
        self.pad_multiple = pad_multiple
        if text_padding not in ("longest", "max_length"):
            raise ValueError(f"text_padding must be 'longest' or 'max_length', got {text_padding!r}")
        self.text_padding = text_padding
        self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokenizer"] = None  # each process loads its own copy
        return state

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            texts,
            padding=self.text_padding,
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
        }

    def images(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        n_images = len(examples[0].images)
        flat = [img for ex in examples for img in ex.images]
        shapes = {tuple(t.shape) for t in flat}
        if len(shapes) == 1:
            pixels = torch.stack(flat)
            out = {"pixel_values": pixels.view(len(examples), n_images, *pixels.shape[1:])}
        else:
            pixels, mask = pad_to(flat, self.pad_multiple)
            out = {
                "pixel_values": pixels.view(len(examples), n_images, *pixels.shape[1:]),
                "pixel_mask": mask.view(len(examples), n_images, *mask.shape[1:]),
            }
        return out

    def labels(self, examples: list[Example]) -> torch.Tensor:
        if self.task == "vqa2":
            target = torch.zeros(len(examples), self.num_answers, dtype=torch.float32)
            for i, ex in enumerate(examples):
                indices, scores = ex.label
                if indices:
                    target[i, torch.tensor(indices)] = torch.tensor(scores, dtype=torch.float32)
            return target
        return torch.tensor([ex.label for ex in examples], dtype=torch.long)

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        batch: dict[str, Any] = self.images(examples)
        if examples[0].text is not None:
            batch.update(self.tokenize([ex.text for ex in examples]))
            if self.labeled and self.task != "retrieval":
                batch["labels"] = self.labels(examples)
        if self.task == "retrieval":
            batch["image_ids"] = torch.tensor([ex.image_index for ex in examples], dtype=torch.long)
        batch["keys"] = [ex.key for ex in examples]
        batch["meta"] = [ex.meta for ex in examples]
        return batch
