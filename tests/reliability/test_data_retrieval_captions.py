"""Retrieval captions from records whose ``.json`` member is unusable (found while splitting data/stream.py).

``scan_retrieval_texts`` counted a bad record's lost captions from the *previous* record's ``.json`` (or, for the
first record of the split, crashed with ``UnboundLocalError``). Each bad record now counts its own captions: its
text list when the member parses, else one.
"""

from __future__ import annotations

import json

from data_helpers import image_bytes, record

from pumer_lightning.data import VLDataModule
from pumer_lightning.data.schema import ShardInfo, SplitMeta, shard_name, write_split_meta
from pumer_lightning.data.writer import write_shard


def caption_record(i: int, captions: int) -> dict:
    texts = [{"text_id": f"{i}-{j}", "text": f"caption {i} {j}"} for j in range(captions)]
    return record(f"img{i}", texts, [image_bytes((i, 0, 0), (12, 12))], image_index=i)


def test_bad_caption_records_count_their_own_captions(tmp_path, tokenizer_dir):
    recs = [caption_record(i, 3) for i in range(4)]
    recs[0] = dict(recs[0], json=b"{not json")  # the split's first record: 1 caption counted
    no_index = json.loads(recs[2]["json"])
    del no_index["image_index"]  # parses, 3 texts, no image_index: its 3 captions counted
    recs[2] = dict(recs[2], json=json.dumps(no_index).encode())
    split_dir = tmp_path / "val"
    split_dir.mkdir()
    write_shard(split_dir / shard_name("retrieval", "val", 0), recs)
    infos = [ShardInfo(shard_name("retrieval", "val", 0), 4, 12)]
    meta = SplitMeta.from_shards(task="retrieval", split="val", dataset="test", shards=infos, labeled=False,
                                 labels=None)  # fmt: skip
    write_split_meta(split_dir, meta)
    dm = VLDataModule(
        task="retrieval", data_dir=str(tmp_path), tokenizer=str(tokenizer_dir), image_size=16, num_workers=0
    )
    texts = dm.retrieval_texts("val")
    assert texts.text_ids == ["1-0", "1-1", "1-2", "3-0", "3-1", "3-2"]
    assert texts.image_ids.tolist() == [1, 1, 1, 3, 3, 3] and texts.all_image_ids.tolist() == [1, 3]
    assert texts.skipped == {"bad_json": 4} and dm.skipped == {"val/bad_json": 4}
