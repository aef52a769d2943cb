"""Retrieval captions: every caption of a split with its paired image, for the N_img x N_text score matrix."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..collate import Collator
from ..schema import SplitMeta
from .records import unicode_problem
from .skips import SkipCounter


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
    are left out, logged and counted in ``skipped``; so are those of a shard that cannot be read to its end (as
    many as its ``meta.json`` entry lists beyond those read).
    """
    captions = _Captions(SkipCounter(f"{meta.task}/{meta.split} captions"))
    for s in meta.shards:
        path = Path(split_dir) / s.name
        before = captions.accounted()
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".json"):
                        f = tar.extractfile(member)
                        payload = f.read() if f is not None else b""
                        captions.add(member.name[: -len(".json")], payload, path.name)
        except (OSError, tarfile.TarError) as exc:
            lost = max(1, s.samples - (captions.accounted() - before))
            detail = f"could not be read to its end ({exc})"
            captions.counter.skip("shard_error", "(captions)", path.name, detail, n=lost)
    return RetrievalTexts(
        text_ids=captions.text_ids,
        texts=captions.texts,
        image_ids=torch.tensor(captions.pairs, dtype=torch.long),
        all_image_ids=torch.tensor(sorted(captions.images), dtype=torch.long),
        collator=collator,
        skipped=dict(captions.counter.total),
    )


@dataclass
class _Captions:
    """The captions of a split read so far, with the image each is paired with."""

    counter: SkipCounter
    text_ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    pairs: list[int] = field(default_factory=list)
    images: set[int] = field(default_factory=set)

    def accounted(self) -> int:
        """Captions kept or counted as skipped so far."""
        return len(self.texts) + sum(self.counter.total.values())

    def add(self, key: str, payload: bytes, shard: str) -> None:
        """Keep the scorable captions of record ``key`` (its ``.json`` member ``payload``); count the others."""
        try:
            image_index, entries = _caption_record(payload)
        except (ValueError, KeyError, TypeError) as exc:
            detail = f"its captions are left out ({exc})"
            self.counter.skip("bad_json", key, shard, detail, n=_texts_claimed(payload))
            return
        self.images.add(image_index)
        for j, entry in enumerate(entries):
            text_id = str(entry.get("text_id", f"{key}-{j}")) if isinstance(entry, dict) else f"{key}-{j}"
            text = entry.get("text") if isinstance(entry, dict) else None
            if not isinstance(text, str) or not text.strip():
                self.counter.skip("missing_text", text_id, shard, f"record {key}, text entry {j}")
                continue
            problem = unicode_problem(text) or unicode_problem(text_id)
            if problem is not None:
                self.counter.skip("bad_text", ascii(text_id), shard, f"record {key}: {problem}")
                continue
            self.text_ids.append(text_id)
            self.texts.append(text)
            self.pairs.append(image_index)


def _caption_record(payload: bytes) -> tuple[int, list[Any]]:
    """(image_index, text entries) of a retrieval record's ``.json`` member; raise if it lacks either."""
    info = json.loads(payload)
    if not isinstance(info, dict):
        raise TypeError(f"the .json member is a {type(info).__name__}, not an object")
    image_index = info["image_index"]
    if isinstance(image_index, bool) or not isinstance(image_index, int):
        raise TypeError(f"image_index {image_index!r} is not an integer")
    entries = info["texts"]
    if not isinstance(entries, list):
        raise TypeError("'texts' is not a list")
    return image_index, entries


def _texts_claimed(payload: bytes) -> int:
    """How many captions a record with an unusable ``.json`` member held: its text list if it parses, else 1."""
    try:
        info = json.loads(payload)
    except ValueError:
        return 1
    texts = info.get("texts") if isinstance(info, dict) else None
    return max(1, len(texts)) if isinstance(texts, list) else 1
