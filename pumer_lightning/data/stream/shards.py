"""Reading shards: every record of a tar shard, checked against what ``meta.json`` claims for it.

:func:`read_shard` yields the raw records of a shard and counts what it loses (an unreadable or cut-short
shard, records without a readable ``.json``); :func:`count_shard` counts a shard's records and texts from its
headers and ``.json`` members alone (the evaluation loaders' length). A shard whose complete content disagrees
with its ``meta.json`` entry is named in a warning (:func:`warn_counts`); :func:`tar_end` tells a complete shard
from one cut short.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Any

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from .skips import SkipCounter

log = logging.getLogger("pumer_lightning.data")


@dataclass(frozen=True)
class ShardClaim:
    """What ``meta.json`` says a shard holds. A claim to check against the shard, never a limit on reading."""

    records: int
    samples: int


_warned_counts: set[str] = set()


def warn_counts(path: str, records: int, samples: int, claim: ShardClaim | None, unknown: int = 0) -> None:
    """Warn (once per process and shard) when a fully read shard disagrees with its ``meta.json`` counts.

    ``samples`` counts the texts of readable records; ``unknown`` records (no readable ``.json``) hold at least
    one text each, which the claim includes. The warning gives what was read against what is listed: every record
    of the shard was read, so nothing is lost by the disagreement itself."""
    if claim is None or path in _warned_counts:
        return
    if records == claim.records and (
        samples == claim.samples if not unknown else samples + unknown <= claim.samples
    ):
        return
    _warned_counts.add(path)
    log.warning(
        "%s was read to its end: records / examples read %d / %d vs listed %d / %d in its meta.json entry; "
        "nothing is lost, the counts in meta.json are out of date (re-run the conversion to rewrite them)",
        *(path, records, samples, claim.records, claim.samples),
    )


def tar_end(path: str) -> tuple[bool, int]:
    """(whether the tar file ends with its end-of-archive marker, the offset where reading its headers stopped).

    Python's ``tarfile`` ends a read silently at a zero block (the marker), at the end of the file and at a
    header it cannot parse after the first one; only the first is a complete file. So a shard that yields fewer
    records than ``meta.json`` lists is out of date (the marker is there) or cut short (it is not).
    """
    try:
        with tarfile.open(path, "r:") as tar:
            for _ in tar:
                pass
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            block = f.read(512)
    except (OSError, tarfile.TarError, EOFError):
        return False, 0
    return len(block) == 512 and block == bytes(512), end


def record_info(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, str]:
    """Parse the ``.json`` member of a raw record: (info, None, "") or (None, skip reason, detail)."""
    payload = raw.get("json")
    if payload is None:
        return None, "missing_json", "the record has no .json member"
    try:
        info = json.loads(payload)
        if not isinstance(info, dict):
            raise TypeError(f"the .json member is a {type(info).__name__}, not an object")
        texts = info["texts"]
        if not isinstance(texts, list):
            raise TypeError("'texts' is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        return None, "bad_json", f"{type(exc).__name__}: {exc}"
    return info, None, ""


def read_shard(
    path: str,
    counter: SkipCounter,
    claim: ShardClaim | int | None = None,
    report: bool = True,
    images_only: bool = False,
):
    """Yield the raw WebDataset samples of one shard, every record of it, whatever ``meta.json`` claims.

    Each yielded record carries its parsed ``.json`` member (``"__info__"``) or why it has none (``"__bad__"``).
    With ``report`` (the one slot that owns the shard), the losses the record parser cannot count are counted
    here once the shard is read: a read error (``shard_error``) and records whose ``.json`` member is missing or
    unreadable (``missing_json``/``bad_json``). Their texts are unknown, so the examples they lost are taken from
    ``claim`` (the shard's ``meta.json`` counts): the claimed examples that the readable records do not account
    for, at least one per lost record. A shard whose fully read content disagrees with ``claim`` is reported
    with a warning naming the file.
    """
    if isinstance(claim, int):
        claim = ShardClaim(claim, claim)
    errors: list[BaseException] = []
    records = texts = 0
    last_key = "(none)"
    unknown: list[tuple[str, str, str]] = []  # (reason, key, detail) of records whose texts are unknown

    def handler(exn: BaseException) -> bool:
        errors.append(exn)
        return True

    name = os.path.basename(path)
    try:
        with open(path, "rb") as stream:
            source = [{"url": path, "stream": stream}]
            for raw in group_by_keys(tar_file_expander(source, handler=handler), handler=handler):
                records += 1
                last_key = raw.get("__key__", last_key)
                info, reason, detail = record_info(raw)
                if info is None:
                    raw["__bad__"] = (reason, detail)
                    unknown.append((reason, last_key, detail))  # type: ignore[arg-type]
                else:
                    raw["__info__"] = info
                    texts += len(info["texts"])
                yield raw
    except OSError as exc:
        errors.append(exc)
    if not report:
        return
    if images_only:  # one example per record: every loss is known exactly
        known, claimed = records - len(unknown), (claim.records if claim is not None else None)
    else:
        known, claimed = texts, (claim.samples if claim is not None else None)
    deficit = (claimed - known) if claimed is not None else 0
    what = f"{type(errors[0]).__name__}: {errors[0]}" if errors else ""
    if not errors and claim is not None and records < claim.records:
        complete, end = tar_end(path)
        if not complete:
            what = f"the tar ends without its end-of-archive marker (cut short at byte {end})"
    if what:
        lost = max(1, deficit - len(unknown))
        listed = "" if claim is None else f" vs {claim.records} listed in meta.json"
        detail = f"{what}; records read {records}{listed}"
        counter.skip("shard_error", f"after {last_key}", name, detail, n=lost)
        extra = 0
    else:
        warn_counts(path, records, texts, claim, len(unknown))
        extra = max(0, deficit - len(unknown))
    for i, (reason, key, detail) in enumerate(unknown):
        n = 1 + extra // len(unknown) + (1 if i < extra % len(unknown) else 0)
        note = f" ({n} example(s) lost per the shard's meta.json count)" if n > 1 else ""
        counter.skip(reason, key, name, detail + note, n=n)


_count_cache: dict[tuple[str, int, int], tuple[int, int]] = {}


def count_shard(path: str, claim: ShardClaim | None = None) -> tuple[int, int]:
    """(records with a readable ``.json`` member, texts in them) of a shard, as far as it can be read.

    Reads tar headers and the small ``.json`` members only (image bytes are skipped), so it is cheap next to
    decoding; results are cached per file (path, size, mtime). A missing file counts (0, 0). When the shard reads
    to its end and disagrees with ``claim``, a warning names the file.
    """
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _count_cache:
        return _count_cache[key]
    all_records, records, texts, current = 0, 0, 0, None
    complete = True
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None:
                    continue
                if prefix != current:
                    current = prefix
                    all_records += 1
                if suffix.lower() != "json":
                    continue
                f = tar.extractfile(member)
                try:
                    info = json.loads(f.read()) if f is not None else None
                    n = (
                        len(info["texts"])
                        if isinstance(info, dict) and isinstance(info["texts"], list)
                        else None
                    )
                except (ValueError, KeyError, TypeError):
                    n = None
                if n is not None:
                    records += 1
                    texts += n
    except (OSError, tarfile.TarError, EOFError):
        complete = False
    if complete and claim is not None and all_records < claim.records:
        complete = tar_end(path)[0]  # fewer records than listed: out of date, or cut short
    if complete:
        warn_counts(path, all_records, texts, claim, all_records - records)
    _count_cache[key] = (records, texts)
    return records, texts
