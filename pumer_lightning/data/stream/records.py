"""Records into examples: validating a raw record, expanding it into one example per text, decoding images."""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from ..collate import Example
from ..schema import IMAGE_EXTENSIONS, SNLI_VE_LABELS, images_per_record
from ..transforms import ImageTransform, decode_image
from .shards import record_info
from .skips import SkipCounter


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
            info, reason, detail = record_info(raw)
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
