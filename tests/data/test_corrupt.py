"""Bad data is skipped and counted by reason, good data arrives, nothing crashes."""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter

import numpy as np
import pytest
from data_helpers import image_bytes, png16_gray, png16_rgb, record, write_split
from PIL import Image

from pumer_lightning.data import VLDataModule


def _noise_png(seed: int, size: int = 48) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _t(text_id, text="there is a red circle", label="entailment"):
    return {"text_id": text_id, "text": text, "label": label}


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    jpeg = image_bytes((10, 200, 10), (32, 32), "JPEG")
    rgba = io.BytesIO()
    Image.new("RGBA", (20, 20), (0, 0, 255, 255)).save(rgba, "PNG")
    good = [
        record("rgb", [_t("rgb-0")], [image_bytes((200, 0, 0))]),
        record("cmyk", [_t("cmyk-0")], [image_bytes((0, 0, 255), (24, 24), "JPEG", "CMYK")]),
        record("gray", [_t("gray-0", label="neutral")], [image_bytes((90, 90, 90), mode="L")]),
        record("rgba", [_t("rgba-0")], [rgba.getvalue()]),
        record("gray16", [_t("gray16-0", label="contradiction")], [png16_gray(50000)]),
        record("rgb16", [_t("rgb16-0")], [png16_rgb()]),
        record("palette", [_t("palette-0")], [image_bytes((5, 6, 7), mode="P")]),
        record("notext", [{"text_id": "notext-0", "label": "neutral"}, _t("notext-1")], [jpeg]),
        record("emptytext", [_t("emptytext-0", text="   "), _t("emptytext-1")], [jpeg]),
        record("badlabel", [_t("badlabel-0", label="maybe"), _t("badlabel-1")], [jpeg]),
        record("nolabel", [{"text_id": "nolabel-0", "text": "a circle"}], [jpeg]),
    ]
    bad = [
        record("truncated", [_t("truncated-0")], [jpeg[: len(jpeg) // 2]]),
        record("garbage", [_t("garbage-0")], [b"\xff\xd8 this is not really a jpeg"]),
        record("noimage", [_t("noimage-0"), _t("noimage-1")], []),
        {"__key__": "nojson", "img0.png": image_bytes()},
        {"__key__": "badjson", "json": b"{not json", "img0.png": image_bytes()},
    ]
    arrive = [
        "rgb-0", "cmyk-0", "gray-0", "rgba-0", "gray16-0", "rgb16-0", "palette-0",
        "notext-1", "emptytext-1", "badlabel-1",
    ]  # fmt: skip
    # Shard 1 gets truncated in the middle of its third record's image: records 0-1 survive.
    tail = [record(f"tail{i}", [_t(f"tail{i}-0")], [_noise_png(i)]) for i in range(4)]
    records = good + bad + tail
    write_split(root / "val", "snli_ve", records, [len(good) + len(bad), len(tail)], split="val")
    shard = root / "val" / "snli_ve-val-000001.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember("tail2.img0.png")
        cut = member.offset_data + member.size // 2
    shard.write_bytes(shard.read_bytes()[:cut])
    arrive += ["tail0-0", "tail1-0"]
    want = {
        "val/truncated_image": 1,
        "val/decode_error": 1,
        "val/missing_image": 2,
        "val/missing_json": 1,
        "val/bad_json": 1,
        "val/missing_text": 2,
        "val/bad_label": 1,
        "val/missing_label": 1,
        "val/shard_error": 2,  # the examples of tail2 and tail3, cut off by the truncation
    }
    return root, arrive, want


def _dm(root, tokenizer_dir, workers):
    return VLDataModule(
        task="snli_ve",
        data_dir=str(root),
        tokenizer=str(tokenizer_dir),
        image_size=16,
        eval_batch_size=4,
        num_workers=workers,
        train_split="val",
    )


def test_eval_skips_and_counts_by_reason(corrupt, tokenizer_dir, caplog):
    root, arrive, want = corrupt
    dm = _dm(root, tokenizer_dir, 0)
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.data"):
        batches = list(dm.val_dataloader())
    keys = [k for b in batches for k in b["keys"]]
    assert Counter(keys) == Counter(arrive)
    assert dm.skipped == want and dm.skipped_total == 12
    by_key = {
        k: (b["pixel_values"][i], b["labels"][i].item()) for b in batches for i, k in enumerate(b["keys"])
    }
    pixels, label = by_key["gray16-0"]
    assert label == 0  # contradiction
    assert by_key["gray-0"][1] == 1
    # decoded pixels are right whatever the stored mode (0.5/0.5 normalisation: v/255*2-1)
    assert pixels.shape == (1, 3, 16, 16) and abs(pixels[0, 0, 0, 0].item() - (195 / 255 * 2 - 1)) < 0.01
    assert by_key["cmyk-0"][0][0, 2].mean() > 0.8 and by_key["cmyk-0"][0][0, 0].mean() < -0.7
    assert abs(by_key["rgba-0"][0][0, 2].mean().item() - 1.0) < 0.01
    text = caplog.text
    for key, shard in [
        ("truncated", "snli_ve-val-000000.tar"),
        ("garbage", "snli_ve-val-000000.tar"),
        ("noimage", "snli_ve-val-000000.tar"),
        ("notext-0", "snli_ve-val-000000.tar"),
        ("after tail1", "snli_ve-val-000001.tar"),
    ]:
        assert any(key in r.getMessage() and shard in r.getMessage() for r in caplog.records), (key, text)


def test_counts_reach_the_main_process_from_workers(corrupt, tokenizer_dir):
    root, arrive, want = corrupt
    dm = _dm(root, tokenizer_dir, 2)
    keys = [k for b in dm.val_dataloader() for k in b["keys"]]
    assert Counter(keys) == Counter(arrive) and dm.skipped == want


def test_training_streams_through_bad_data(corrupt, tokenizer_dir):
    root, arrive, _ = corrupt
    dm = _dm(root, tokenizer_dir, 0)
    dm.batch_size = 4
    loader = dm.train_dataloader()
    assert dm.num_train_samples == 24 and len(loader) == 24 // 4  # meta.json counts bad examples too
    seen = [k for b in loader for k in b["keys"]]
    assert len(seen) == 4 * len(loader) and set(seen) <= set(arrive)
    assert dm.skipped_total > 0 and all(k.startswith("val/") for k in dm.skipped)


@pytest.mark.parametrize("world", [2, 3])
def test_simulated_ranks_split_bad_data_exactly_once(corrupt, tokenizer_dir, world):
    """Ranks built by hand in one process: 2 shards over 3 ranks forces the record-level split."""
    from pumer_lightning.data.collate import Collator
    from pumer_lightning.data.schema import read_split_meta
    from pumer_lightning.data.stream import EvalStream, RecordParser, StreamLoader
    from pumer_lightning.data.transforms import ImageTransform

    root, arrive, want = corrupt
    meta = read_split_meta(root / "val")
    keys, skipped = [], Counter()
    for rank in range(world):
        stream = EvalStream(split_dir=root / "val", meta=meta, parser=RecordParser("snli_ve", True, meta.labels),
                            transform=ImageTransform(16), collator=Collator("snli_ve", tokenizer_dir),
                            batch_size=3, rank=rank, world_size=world)  # fmt: skip
        keys += [k for b in StreamLoader(stream, on_skipped=skipped.update) for k in b["keys"]]
    assert Counter(keys) == Counter(arrive)
    assert {f"val/{k}": v for k, v in skipped.items()} == want  # the truncated shard is reported once
