"""NLVR2: the official json-lines files and image folders -> shards (one record per image pair).

Source layout (as in the lil-lab/nlvr repository plus the downloaded images)::

    <src>/{train,dev,test1}.json            json lines: identifier, sentence, label ("True"/"False"), ...
    <src>/images/train/<n>/train-<set>-<pair>-img{0,1}.png   (or <src>/train/...; --images DIR overrides)
    <src>/dev/dev-<set>-<pair>-img{0,1}.png
    <src>/test1/test1-<set>-<pair>-img{0,1}.png

The json files may also sit in ``<src>/data``. The identifier ``{split}-{set}-{pair}-{sentence}`` names the image
pair ``{split}-{set}-{pair}``, whose images are ``...-img0`` (left) and ``...-img1`` (right); the record key is
the pair, and each of its sentences is one text entry with ``label`` true/false. Output splits: train, val
(dev), test (test1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..writer import RecordPlan
from .common import PreparedSplit, check_text, find_file, first_dir, index_images, open_text, shuffle_train

SPLITS = {"train": "train", "val": "dev", "test": "test1"}
LABELS = {"True": True, "False": False, "true": True, "false": False}


def prepare(src: Path, splits: list[str] | None, images: Path | None, seed: int) -> list[PreparedSplit]:
    splits = splits or [s for s in SPLITS if find_file(src, f"{SPLITS[s]}.json", (".", "data"), False)]
    if not splits:
        raise FileNotFoundError(
            f"no NLVR2 file in {src} (looked for train.json, dev.json, test1.json in . and data/)"
        )
    out = []
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"--splits: unknown NLVR2 split {split!r} (choose from {', '.join(SPLITS)})")
        official = SPLITS[split]
        path = find_file(src, f"{official}.json", (".", "data"), required=True)
        assert path is not None
        root = images or src
        folder = first_dir([root / "images" / official, root / official], f"NLVR2 {official} image folder")
        stems = index_images(folder)
        pairs: dict[str, list[dict[str, Any]]] = {}
        skipped: dict[str, list[str]] = {}
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise TypeError(f"a line must be a JSON object, got {type(row).__name__}")
                    identifier, sentence, label = row["identifier"], row["sentence"], row["label"]
                    check_text(identifier, "identifier")
                    if identifier.count("-") < 3 or "." in identifier or "/" in identifier:
                        raise ValueError(
                            f"identifier {identifier!r} is not {{split}}-{{set}}-{{pair}}-{{sentence}}"
                        )
                    check_text(sentence, f"sentence of {identifier}")
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    skipped.setdefault("bad_line", []).append(
                        f"{path.name}:{lineno} ({type(exc).__name__}: {exc})"[:300]
                    )
                    continue
                if not isinstance(label, str) or label not in LABELS:
                    skipped.setdefault("bad_label", []).append(f"{identifier}: {label!r}"[:200])
                    continue
                pair = identifier.rsplit("-", 1)[0]
                entry = {"text_id": identifier, "text": sentence, "label": LABELS[label]}
                for extra in ("synset", "query"):
                    if extra in row:
                        entry[extra] = row[extra]
                pairs.setdefault(pair, []).append(entry)
        plans = []
        for pair, entries in pairs.items():
            paths = [stems.get(f"{pair}-img{i}") for i in range(2)]
            missing = [f"{folder}/{pair}-img{i}.*" for i, p in enumerate(paths) if p is None]
            if missing:
                skipped.setdefault("missing_image", []).extend(missing)
                continue
            plans.append(RecordPlan(pair, {"image_id": pair, "texts": entries}, paths))  # type: ignore[arg-type]
        out.append(
            PreparedSplit(
                split=split,
                plans=shuffle_train(split, plans, seed),
                labeled=True,
                labels=["False", "True"],
                extra={"source": path.name},
                skipped=skipped,
            )
        )
    return out
