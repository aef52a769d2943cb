"""Builders for the data and reliability tests: real encoded images, real tar shards, real split directories."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pumer_lightning.data.schema import ShardInfo, SplitMeta, shard_name, write_split_meta
from pumer_lightning.data.writer import encode_record, write_shard


def image_bytes(color=(200, 30, 30), size=(40, 30), fmt="PNG", mode="RGB") -> bytes:
    """A flat image of ``color`` encoded as ``fmt``."""
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png16_rgb(value=(65535, 0, 32768), size=(8, 8)) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write this mode)."""
    w, h = size
    arr = np.empty((h, w, 3), dtype=">u2")
    arr[:] = value
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def png16_gray(value=40000, size=(8, 8)) -> bytes:
    img = Image.fromarray(np.full(size[::-1], value, dtype=np.uint16))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def record(key: str, texts: list[dict[str, Any]], images: list[bytes], **extra: Any) -> dict[str, Any]:
    """An encoded record; ``images`` are encoded bytes (extension sniffed as png/jpg)."""
    exts = ["jpg" if data[:2] == b"\xff\xd8" else "png" for data in images]
    return encode_record(key, {"image_id": key, "texts": texts, **extra}, list(zip(exts, images)))


def _num_texts(rec: dict[str, Any]) -> int:
    try:
        return max(1, len(json.loads(rec["json"])["texts"]))
    except (KeyError, ValueError):
        return 1


def write_split(
    split_dir: Path,
    task: str,
    records: list[dict[str, Any]],
    shard_sizes: list[int],
    *,
    labeled: bool = True,
    labels: list[str] | None = None,
    split: str = "train",
) -> SplitMeta:
    """Write ``records`` into shards of the given sizes with ``webdataset.TarWriter`` plus meta.json."""
    assert sum(shard_sizes) == len(records), (shard_sizes, len(records))
    split_dir.mkdir(parents=True, exist_ok=True)
    shards, start = [], 0
    for i, size in enumerate(shard_sizes):
        chunk = records[start : start + size]
        start += size
        name = shard_name(task, split, i)
        write_shard(split_dir / name, chunk)
        samples = sum(_num_texts(r) for r in chunk)
        shards.append(ShardInfo(name, len(chunk), samples))
    if labels is None:
        labels = {"nlvr2": ["False", "True"], "snli_ve": ["contradiction", "neutral", "entailment"]}.get(task)
    meta = SplitMeta.from_shards(
        task=task, split=split, dataset="test", shards=shards, labeled=labeled, labels=labels
    )
    write_split_meta(split_dir, meta)
    return meta


def nlvr2_split(split_dir: Path, shard_sizes: list[int], split: str = "train", size=(16, 16)) -> list[str]:
    """NLVR2-style records with one statement each; returns the example keys in write order."""
    records, keys = [], []
    n = sum(shard_sizes)
    for i in range(n):
        key = f"{split}-{i}-0"
        text_id = f"{key}-0"
        keys.append(text_id)
        texts = [
            {
                "text_id": text_id,
                "text": f"the left image contains {'two' if i % 2 else 'one'} circle",
                "label": bool(i % 2),
            }
        ]
        left = image_bytes((i % 256, 0, 0), size)
        right = image_bytes((0, i % 256, 0), size)
        records.append(record(key, texts, [left, right]))
    write_split(split_dir, "nlvr2", records, shard_sizes, split=split)
    return keys
