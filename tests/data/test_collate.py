from __future__ import annotations

import pytest
import torch

from pumer_lightning.data.collate import Collator, Example


def _ex(text, label=None, n_images=1, size=(3, 8, 8), image_index=None):
    return Example(
        key=text,
        record_key="r",
        shard="s.tar",
        images=[torch.zeros(size) + i for i in range(n_images)],
        text=text,
        label=label,
        image_index=image_index,
        meta={"text": text},
    )


def test_pads_to_longest_text_of_the_batch_not_max_len(tokenizer_dir):
    c = Collator("nlvr2", tokenizer_dir, max_text_len=40)
    batch = c([_ex("a red circle", 1, 2), _ex("there is a blue square left of the green circle", 0, 2)])
    # [CLS] + 10 words + [SEP] = 12, far below max_text_len=40
    assert batch["input_ids"].shape == (2, 12) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].tolist()[0] == [1] * 5 + [0] * 7  # right padding
    tok = c.tokenizer
    assert batch["input_ids"][0, 0] == tok.cls_token_id and batch["input_ids"][0, 4] == tok.sep_token_id
    assert (batch["input_ids"][0, 5:] == tok.pad_token_id).all()
    assert tok.unk_token_id not in batch["input_ids"][1].tolist()
    assert batch["pixel_values"].shape == (2, 2, 3, 8, 8)
    assert batch["pixel_values"][0, 1].eq(1).all()  # image order kept: img0 then img1
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.int64
    assert batch["keys"] == ["a red circle", "there is a blue square left of the green circle"]


def test_max_length_padding_gives_static_width(tokenizer_dir):
    c = Collator("nlvr2", tokenizer_dir, max_text_len=40, text_padding="max_length")
    batch = c([_ex("a red circle", 1, 2), _ex("there is a blue square", 0, 2)])
    assert batch["input_ids"].shape == (2, 40)
    assert batch["attention_mask"].sum(1).tolist() == [5, 7]


def test_unknown_text_padding_is_named(tokenizer_dir):
    with pytest.raises(ValueError, match="text_padding must be 'longest' or 'max_length'"):
        Collator("nlvr2", tokenizer_dir, text_padding="max")


def test_truncates_to_max_text_len_keeping_sep(tokenizer_dir):
    c = Collator("snli_ve", tokenizer_dir, max_text_len=6)
    batch = c([_ex("the red circle is left of the blue square", 2), _ex("a circle", 0)])
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0, -1] == c.tokenizer.sep_token_id
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]


def test_vqa_soft_scores_become_a_dense_target(tokenizer_dir):
    c = Collator("vqa2", tokenizer_dir, num_answers=5)
    batch = c([_ex("what color ?", ([1, 3], [1.0, 0.3])), _ex("how many ?", ([], []))])
    assert batch["labels"].dtype == torch.float32
    assert torch.allclose(batch["labels"], torch.tensor([[0, 1.0, 0, 0.3, 0], [0, 0, 0, 0, 0]]))


def test_retrieval_has_image_ids_and_no_labels(tokenizer_dir):
    c = Collator("retrieval", tokenizer_dir)
    batch = c([_ex("a red circle", image_index=7), _ex("a blue square", image_index=7)])
    assert "labels" not in batch and batch["image_ids"].tolist() == [7, 7]


def test_unlabelled_split_has_no_labels_and_mixed_sizes_get_a_mask(tokenizer_dir):
    c = Collator("vqa2", tokenizer_dir, num_answers=3, labeled=False)
    batch = c([_ex("what ?", size=(3, 32, 64)), _ex("what ?", size=(3, 64, 32))])
    assert "labels" not in batch
    assert batch["pixel_values"].shape == (2, 1, 3, 64, 64)
    assert batch["pixel_mask"].shape == (2, 1, 64, 64) and batch["pixel_mask"].dtype == torch.int64
    assert batch["pixel_mask"][0, 0].sum() == 32 * 64
