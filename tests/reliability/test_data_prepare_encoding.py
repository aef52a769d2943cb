"""Annotation files in other encodings than plain UTF-8.

``data.prepare`` read annotation files with the locale's codec: a UTF-16 file stopped with a bare ``'utf-8' codec
can't decode byte 0xff`` naming no file, and a UTF-8 byte-order mark made the first line of each JSON-lines file
a ``bad_line``. Every preparer now reads UTF-8 with or without a BOM and UTF-16 with a BOM, and anything else stops
with one error naming the file and the encodings expected.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from PIL import Image

from pumer_lightning.data.prepare import main
from pumer_lightning.data.schema import read_split_meta

EXPECTED = "expected UTF-8 (with or without a byte-order mark) or UTF-16 with a byte-order mark"
ROWS = [
    {"identifier": f"dev-{i}-0-0", "sentence": f"caf\u00e9 sentence {i}", "label": ["False", "True"][i % 2]}
    for i in range(3)
]


def encode(text: str, encoding: str) -> bytes:
    """``text`` in ``encoding``; the ``-bom`` variants put a byte-order mark first."""
    boms = {"utf-8-bom": (codecs.BOM_UTF8, "utf-8"), "utf-16-le-bom": (codecs.BOM_UTF16_LE, "utf-16-le"),
            "utf-16-be-bom": (codecs.BOM_UTF16_BE, "utf-16-be")}  # fmt: skip
    if encoding in boms:
        bom, codec = boms[encoding]
        return bom + text.encode(codec)
    return text.encode(encoding)


@pytest.fixture
def nlvr2_src(tmp_path) -> Path:
    src = tmp_path / "src"
    for i in range(3):
        for side, color in (("img0", (200, 0, 0)), ("img1", (0, 0, 200))):
            path = src / "dev" / f"dev-{i}-0-{side}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 12), color).save(path)
    return src


def run(src: Path, out: Path, dataset: str = "nlvr2", splits: str = "val") -> int:
    return main(
        [dataset, "--src", str(src), "--out", str(out), "--splits", splits, "--workers", "1", "--no-progress"]
    )


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-bom", "utf-16", "utf-16-le-bom", "utf-16-be-bom"])
def test_json_lines_in_utf8_with_or_without_bom_and_utf16_with_bom_convert_every_line(
    nlvr2_src, tmp_path, encoding, capsys
):
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
    (nlvr2_src / "dev.json").write_bytes(encode(lines, encoding))
    assert run(nlvr2_src, tmp_path / "out") == 0
    report = capsys.readouterr().out
    assert "bad_line" not in report, report
    meta = read_split_meta(tmp_path / "out" / "val")
    assert (meta.num_records, meta.num_samples) == (3, 3)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (
            encode(json.dumps(ROWS[0], ensure_ascii=False) + "\n", "latin-1"),
            "is not valid UTF-8 (bytes b'\\xe9",
        ),
        (
            encode(json.dumps(ROWS[0]) + "\n", "utf-16-le"),
            "holds NUL bytes (UTF-16 or UTF-32 without a byte-order",
        ),
        (encode(json.dumps(ROWS[0]) + "\n", "utf-32"), "is UTF-32"),
        (codecs.BOM_UTF16_LE + b"{\x00\x00\xd8}\x00", "is not valid UTF-16"),  # a lone high surrogate
    ],
    ids=["latin-1", "utf-16-without-bom", "utf-32", "broken-utf-16"],
)
def test_other_encodings_stop_with_one_error_naming_the_file(nlvr2_src, tmp_path, data, says, capsys):
    path = nlvr2_src / "dev.json"
    path.write_bytes(data)
    assert run(nlvr2_src, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: {says}"), err
    assert EXPECTED in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "val" / "meta.json").exists()


@pytest.mark.parametrize("encoding", ["utf-8-bom", "utf-16"])
def test_whole_json_annotation_files_read_with_a_bom(tmp_path, encoding):
    """The Karpathy split file (one JSON document, as VQAv2's question and annotation files)."""
    src = tmp_path / "src"
    images = []
    for i in range(2):
        Image.new("RGB", (16, 12), (90 * i, 0, 0)).save(_mkdir(src / "flickr30k-images") / f"{i}.jpg")
        sentences = [{"raw": f"a caf\u00e9 {i}", "tokens": [], "sentid": i, "imgid": i}]
        images.append(
            {"filename": f"{i}.jpg", "imgid": i, "split": "test", "sentences": sentences, "sentids": [i]}
        )
    (src / "dataset_flickr30k.json").write_bytes(encode(json.dumps({"images": images}), encoding))
    assert run(src, tmp_path / "out", "flickr30k", "test") == 0
    assert read_split_meta(tmp_path / "out" / "test").num_samples == 2


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
