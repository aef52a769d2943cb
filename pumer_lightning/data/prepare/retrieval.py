"""Flickr30k and MSCOCO retrieval: Karpathy split json and images -> shards (task ``retrieval``).

Source layout::

    <src>/dataset_flickr30k.json  and  <src>/flickr30k-images/<filename>   (or flickr30k_images/, images/)
    <src>/dataset_coco.json       and  <src>/{train2014,val2014}/<filename> (<filepath>/<filename>; or images/)

``--images DIR`` overrides the image folder (Flickr30k) or the folder holding train2014/val2014 (COCO).
One record per image; its captions (the ``raw`` sentences) are text entries with ``text_id`` = Karpathy
``sentid``. The record's ``image_index`` is Karpathy's ``imgid``, the integer id used to pair images and
captions in evaluation. Output splits follow Karpathy's ``split`` field: train, val, test (and restval for
COCO, which PuMer leaves out of training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..writer import RecordPlan
from .common import PreparedSplit, find_file, first_dir, open_text, shuffle_train

KARPATHY_FILES = {"flickr30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}


def prepare(
    src: Path, splits: list[str] | None, images: Path | None, seed: int, dataset: str = "flickr30k"
) -> list[PreparedSplit]:
    if dataset not in KARPATHY_FILES:
        raise ValueError(f"unknown retrieval dataset {dataset!r}")
    path = find_file(src, KARPATHY_FILES[dataset], (".", "data", "karpathy"))
    assert path is not None
    try:
        with open_text(path) as f:
            entries = json.load(f)["images"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{path}: not a Karpathy split file ({exc})") from exc
    if dataset == "flickr30k":
        root = images or first_dir(
            [src / "flickr30k-images", src / "flickr30k_images", src / "images"], "Flickr30k image folder"
        )
    else:
        root = images or first_dir([src, src / "images"], "COCO image root")
    present = sorted({e.get("split", "?") for e in entries})
    wanted = splits or present
    for s in wanted:
        if s not in present:
            raise ValueError(f"--splits: {path.name} has no split {s!r} (it has {', '.join(present)})")
    by_split: dict[str, list[RecordPlan]] = {s: [] for s in wanted}
    skipped: dict[str, dict[str, list[str]]] = {s: {} for s in wanted}
    for e in entries:
        split = e.get("split")
        if split not in by_split:
            continue
        try:
            imgid = int(e["imgid"])
            filename = e["filename"]
            texts = [
                {"text_id": str(sent["sentid"]), "text": sent["raw"]}
                for sent in e["sentences"]
                if isinstance(sent.get("raw"), str) and sent["raw"].strip()
            ]
        except (KeyError, TypeError, ValueError) as exc:
            skipped[split].setdefault("bad_entry", []).append(f"{e.get('filename', '?')} ({exc})")
            continue
        image_path = (
            root / e["filepath"] / filename if dataset == "coco" and "filepath" in e else root / filename
        )
        key = Path(filename).stem.replace(".", "_")
        info: dict[str, Any] = {"image_id": Path(filename).stem, "image_index": imgid, "texts": texts}
        if "cocoid" in e:
            info["coco_id"] = e["cocoid"]
        by_split[split].append(RecordPlan(key, info, [image_path]))
    return [
        PreparedSplit(
            split=s,
            plans=shuffle_train(s, sorted(by_split[s], key=lambda p: p.info["image_index"]), seed),
            labeled=False,
            labels=None,
            extra={"source": path.name, "dataset": dataset},
            skipped=skipped[s],
        )
        for s in wanted
    ]
