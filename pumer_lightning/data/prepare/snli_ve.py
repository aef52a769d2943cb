"""SNLI-VE: the json-lines files of the SNLI-VE creation scripts and Flickr30k images -> shards.

Source layout::

    <src>/snli_ve_{train,dev,test}.jsonl     fields: pairID, Flickr30K_ID, sentence1, sentence2, gold_label
    <src>/flickr30k_images/<Flickr30K_ID>.jpg   (or flickr30k-images/, images/; --images DIR overrides)

One record per Flickr30k image; each hypothesis (``sentence2``, the only text the model reads) is a text entry
with ``label`` contradiction/neutral/entailment and the premise kept as ``premise``. Output splits: train,
val (dev), test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..schema import SNLI_VE_LABELS
from ..writer import RecordPlan
from .common import PreparedSplit, check_text, find_file, first_dir, open_text, shuffle_train

SPLITS = {"train": "train", "val": "dev", "test": "test"}


def prepare(src: Path, splits: list[str] | None, images: Path | None, seed: int) -> list[PreparedSplit]:
    names = {s: f"snli_ve_{o}.jsonl" for s, o in SPLITS.items()}
    splits = splits or [s for s in SPLITS if find_file(src, names[s], (".", "data"), False)]
    if not splits:
        raise FileNotFoundError(f"no SNLI-VE file in {src} (looked for {', '.join(names.values())})")
    image_dir = images or first_dir(
        [
            src / "flickr30k_images",
            src / "flickr30k-images",
            src / "Flickr30k" / "flickr30k-images",
            src / "images",
        ],
        "Flickr30k image folder",
    )
    if not image_dir.is_dir():
        raise FileNotFoundError(f"--images {image_dir} is not a directory")
    out = []
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"--splits: unknown SNLI-VE split {split!r} (choose from {', '.join(SPLITS)})")
        path = find_file(src, names[split], (".", "data"))
        assert path is not None
        by_image: dict[str, list[dict[str, Any]]] = {}
        skipped: dict[str, list[str]] = {}
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise TypeError(f"a line must be a JSON object, got {type(row).__name__}")
                    image, label = str(row["Flickr30K_ID"]), row["gold_label"]
                    text_id, text = str(row["pairID"]), row["sentence2"]
                    entry = {
                        "text_id": text_id,
                        "text": text,
                        "label": label,
                        "premise": row.get("sentence1"),
                    }
                    check_text(entry["text_id"], "pairID")
                    check_text(entry["text"], f"sentence2 of {entry['text_id']}")
                    check_text(image, "Flickr30K_ID")
                    if isinstance(entry["premise"], str):
                        check_text(entry["premise"], f"sentence1 of {entry['text_id']}")
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    skipped.setdefault("bad_line", []).append(
                        f"{path.name}:{lineno} ({type(exc).__name__}: {exc})"[:300]
                    )
                    continue
                if not isinstance(label, str) or label not in SNLI_VE_LABELS:
                    skipped.setdefault("bad_label", []).append(f"{entry['text_id']}: {label!r}"[:200])
                    continue
                by_image.setdefault(image, []).append(entry)
        plans = [
            RecordPlan(image, {"image_id": image, "texts": entries}, [image_dir / f"{image}.jpg"])
            for image, entries in sorted(by_image.items())
        ]
        out.append(
            PreparedSplit(
                split=split,
                plans=shuffle_train(split, plans, seed),
                labeled=True,
                labels=list(SNLI_VE_LABELS),
                extra={"source": path.name},
                skipped=skipped,
            )
        )
    return out
