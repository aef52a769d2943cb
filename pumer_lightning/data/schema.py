"""The on-disk format shared by every task: WebDataset tar shards plus one ``meta.json`` per split.

Layout of a dataset root (``data/nlvr2``, ``data/shapes/vqa2``, ...)::

    <root>/<split>/<task>-<split>-000000.tar     shards, written with ``webdataset.TarWriter``
    <root>/<split>/meta.json                     counts, shard list, label vocabulary

One tar *record* is one image (one image pair for NLVR2) with the list of every text that refers to it, so an
image is stored once however many questions or captions it has. The loader expands a record into one *example*
per text. Tar members of a record ``<key>`` (``<key>`` holds no dot, as WebDataset splits names at the first dot):

- ``<key>.json``: ``{"image_id": str, "texts": [{"text_id": str, "text": str, "label": ..., ...}, ...], ...}``
- ``<key>.img0.<ext>``: the encoded image (original bytes, ``ext`` is ``jpg``, ``png``, ``webp``, ...)
- ``<key>.img1.<ext>``: NLVR2 only, the right image of the pair.

Labels inside a text entry, per task:

- ``nlvr2``: ``"label": true | false``
- ``snli_ve``: ``"label": "contradiction" | "neutral" | "entailment"``
- ``vqa2``: ``"label": {answer: soft score}`` (answers in the split's vocabulary) and ``"answers"`` (raw list)
- ``retrieval``: no label; the record carries ``"image_index": int``, the integer image id used for pairing.

Unlabelled splits (VQAv2 test) have ``"labeled": false`` in ``meta.json`` and no ``label`` fields.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Task = Literal["nlvr2", "vqa2", "snli_ve", "retrieval"]
TASKS: tuple[str, ...] = ("nlvr2", "vqa2", "snli_ve", "retrieval")

SCHEMA_VERSION = "pumer-wds/1"
META_FILE = "meta.json"
#: Written by a conversion while it runs (the shards done so far), replaced by ``meta.json`` at its end.
PROGRESS_FILE = ".progress.json"

NLVR2_LABELS: tuple[str, ...] = ("False", "True")  # index = int(label)
SNLI_VE_LABELS: tuple[str, ...] = ("contradiction", "neutral", "entailment")

#: Image extensions a record may use for ``img0``/``img1`` (PIL sniffs the real format from the bytes).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


def images_per_record(task: str) -> int:
    """How many images one record of ``task`` carries (NLVR2 statements are about an image pair)."""
    check_task(task)
    return 2 if task == "nlvr2" else 1


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {', '.join(TASKS)}")


def shard_name(task: str, split: str, index: int) -> str:
    return f"{task}-{split}-{index:06d}.tar"


@dataclass
class ShardInfo:
    """One shard of a split: file name (relative to the split directory) and what it holds."""

    name: str
    records: int
    samples: int
    fingerprint: str = ""  # converters: hash of the planned content, so a resumed run can skip the shard
    skipped: dict[str, int] = field(default_factory=dict)  # records dropped while writing, by reason


@dataclass
class SplitMeta:
    """Content of ``<root>/<split>/meta.json``.

    ``num_samples`` counts examples (texts), which is what an epoch iterates over; ``num_records`` counts tar
    records (images or image pairs). ``labels`` is the label vocabulary: the class names for NLVR2 and SNLI-VE
    (index = class id), the answer list for VQAv2 (index = position in the soft-score vector), ``None`` for
    retrieval.
    """

    task: str
    split: str
    dataset: str
    num_samples: int
    num_records: int
    num_images: int
    labeled: bool
    labels: list[str] | None
    shards: list[ShardInfo]
    schema: str = SCHEMA_VERSION
    created_by: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: str | Path = "meta.json") -> SplitMeta:
        """Build from parsed ``meta.json``; a missing or wrong-typed field raises one ValueError naming the file
        and the field."""
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("task", "split", "num_samples", "num_records", "shards") if k not in obj]
        if missing:
            raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
        if obj.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema {obj.get('schema')!r} is not {SCHEMA_VERSION!r}")
        _check_fields(path, "", obj, _META_FIELDS)
        if not isinstance(obj["shards"], list):
            raise ValueError(f"{path}: field 'shards' must be a list, got {type(obj['shards']).__name__}")
        shards = []
        for i, entry in enumerate(obj["shards"]):
            where = f"shards[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: field '{where}' must be an object, got {type(entry).__name__}")
            absent = [k for k in ("name", "records", "samples") if k not in entry]
            if absent:
                raise ValueError(f"{path}: missing field(s) {', '.join(f'{where}.{k}' for k in absent)}")
            _check_fields(path, f"{where}.", entry, _SHARD_FIELDS)
            unknown = sorted(set(entry) - set(_SHARD_FIELDS))
            if unknown:
                raise ValueError(f"{path}: unknown field(s) {', '.join(f'{where}.{k}' for k in unknown)}")
            if entry["records"] < 0 or entry["samples"] < 0:
                raise ValueError(f"{path}: field '{where}.records'/'{where}.samples' must be >= 0")
            shards.append(ShardInfo(**entry))
        return cls(
            task=obj["task"],
            split=obj["split"],
            dataset=obj.get("dataset", ""),
            num_samples=int(obj["num_samples"]),
            num_records=int(obj["num_records"]),
            num_images=int(obj.get("num_images", obj["num_records"])),
            labeled=bool(obj.get("labeled", True)),
            labels=obj.get("labels"),
            shards=shards,
            schema=obj.get("schema", SCHEMA_VERSION),
            created_by=obj.get("created_by", ""),
            extra=obj.get("extra", {}),
        )

    @classmethod
    def from_shards(
        cls,
        *,
        task: str,
        split: str,
        dataset: str,
        shards: Iterable[ShardInfo],
        labeled: bool,
        labels: list[str] | None,
        created_by: str = "",
        extra: dict[str, Any] | None = None,
    ) -> SplitMeta:
        shards = list(shards)
        records = sum(s.records for s in shards)
        return cls(
            task=task,
            split=split,
            dataset=dataset,
            num_samples=sum(s.samples for s in shards),
            num_records=records,
            num_images=records * images_per_record(task),
            labeled=labeled,
            labels=labels,
            shards=shards,
            created_by=created_by,
            extra=extra or {},
        )


_INT = (int,)
#: field -> (allowed types, what the error message says was expected); ``bool`` is never accepted as an int.
_META_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "task": ((str,), "a string"),
    "split": ((str,), "a string"),
    "dataset": ((str,), "a string"),
    "num_samples": (_INT, "an integer"),
    "num_records": (_INT, "an integer"),
    "num_images": (_INT, "an integer"),
    "labeled": ((bool,), "true or false"),
    "labels": ((list, type(None)), "a list of strings or null"),
    "schema": ((str,), "a string"),
    "created_by": ((str,), "a string"),
    "extra": ((dict,), "an object"),
}
_SHARD_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string (the shard's file name)"),
    "records": (_INT, "an integer"),
    "samples": (_INT, "an integer"),
    "fingerprint": ((str,), "a string"),
    "skipped": ((dict,), "an object"),
}


def _check_fields(path: str | Path, prefix: str, obj: dict[str, Any], spec: dict) -> None:
    for key, (types, expected) in spec.items():
        if key not in obj:
            continue
        value = obj[key]
        ok = isinstance(value, types) and not (bool not in types and isinstance(value, bool))
        if ok and key == "labels" and value is not None:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise ValueError(f"{path}: field '{prefix}{key}' must be {expected}, got {value!r}"[:300])


def read_split_meta(split_dir: str | Path) -> SplitMeta:
    """Read and check ``<split_dir>/meta.json``.

    A shard it lists that is missing on disk is logged here and then skipped and counted as ``shard_error`` by
    the loaders (like any unreadable shard); only a split none of whose shards is on disk is an error. A shard
    name listed twice, or a ``*.tar`` file in the split directory that no entry lists, is an error
    (:func:`check_shard_listing`).
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split directory {split_dir} does not exist")
    path = split_dir / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {split_dir} is not a converted split "
            "(write it with `python -m pumer_lightning.data.prepare ...` or `... .data.shapes`)"
        )
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    meta = SplitMeta.from_json(obj, path)
    check_task(meta.task)
    missing = [s.name for s in meta.shards if not (split_dir / s.name).is_file()]
    check_shard_listing(split_dir, meta, missing)
    if missing:
        message = f"{path} lists shard(s) missing on disk: {_some(missing)}"
        if len(missing) == len(meta.shards):
            raise FileNotFoundError(f"{message} (none of its {len(missing)} shard(s) is there)")
        logging.getLogger("pumer_lightning.data").warning(
            "%s; their examples are skipped and counted as shard_error (is the storage fully mounted/copied?)",
            message,
        )
    return meta


def _some(names: list[str], at_most: int = 3) -> str:
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def check_shard_listing(split_dir: Path, meta: SplitMeta, missing: list[str]) -> None:
    """Raise one ValueError when ``meta.json`` and the split directory disagree on which shards there are.

    Two cases, both errors rather than warnings: a shard name listed twice (it would be read twice, so an
    evaluation would score its examples twice and a training epoch would oversample them) and a ``*.tar`` file
    in the directory that no entry lists (its examples would never be read, and the scores would not say so).
    Either way ``meta.json`` no longer describes the directory (a hand-merged split, a copied-in shard, a
    conversion interrupted between writing shards and rewriting ``meta.json``), and no guess of what was meant
    is safe: a duplicate entry may stand for the unlisted file or be a copy-paste slip. The message names both
    sides so that the fix (edit ``meta.json`` or re-run the conversion) takes a minute and loses nothing.
    """
    path = split_dir / META_FILE
    entries: dict[str, list[int]] = {}
    for i, s in enumerate(meta.shards):
        entries.setdefault(Path(s.name).as_posix(), []).append(i)
    twice = {name: where for name, where in entries.items() if len(where) > 1}
    unlisted = sorted(
        p.name for p in split_dir.glob("*.tar") if not p.name.startswith(".") and p.name not in entries
    )
    if not twice and not unlisted:
        return
    problems = [
        f"shard {name} is listed {len(where)} times (shards[{'], shards['.join(map(str, where))}])"
        for name, where in twice.items()
    ]
    if unlisted:
        problems.append(f"{len(unlisted)} shard file(s) on disk are listed by no entry: {_some(unlisted, 5)}")
    if missing:
        problems.append(f"listed but missing on disk: {_some(missing, 5)}")
    if (split_dir / PROGRESS_FILE).is_file():
        problems.append(
            f"a conversion of this split is running or was interrupted ({PROGRESS_FILE} is there)"
        )
    raise ValueError(
        f"{path} does not describe the shards of {split_dir}: {'; '.join(problems)}. Each shard must be listed "
        "exactly once: fix meta.json or re-run the conversion (`python -m pumer_lightning.data.prepare ...`)"
    )


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so that a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_split_meta(split_dir: str | Path, meta: SplitMeta) -> Path:
    path = Path(split_dir) / META_FILE
    write_json_atomic(path, meta.to_json())
    return path


def image_member(ext: str, index: int = 0) -> str:
    """Tar member suffix of image ``index`` of a record, e.g. ``img0.jpg``."""
    ext = ext.lower().lstrip(".")
    if ext == "jpeg":
        ext = "jpg"
    return f"img{index}.{ext}"


def check_key(key: str) -> str:
    """Record keys become tar member prefixes; WebDataset splits names at the first dot."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"record key {key!r} must be non-empty and hold no '.' or '/'")
    return key
