"""`pumer_lightning.lab.cache`: content hashes and the append-only JSON-lines store."""

from __future__ import annotations

import hashlib
import json
import logging

from pumer_lightning.lab.cache import JsonLinesStore, content_hash


def test_content_hash_is_the_hash_of_sorted_key_json():
    value = {"b": [1, 2.5], "a": None, "path": object.__name__}
    text = json.dumps(value, sort_keys=True)
    assert content_hash(value) == hashlib.sha1(text.encode()).hexdigest()
    assert content_hash(value, "sha256", 12) == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert content_hash({"a": None, "b": [1, 2.5], "path": "object"}) == content_hash(value)
    assert content_hash(("x", 1)) == content_hash(["x", 1])  # tuples hash as lists (the study's old keys)


def test_the_last_line_of_a_key_wins_and_fresh_ignores_the_file(tmp_path):
    path = tmp_path / "sub" / "cache.jsonl"
    store = JsonLinesStore(path)
    store.put({"k": 1}, {"v": 1})
    store.put({"k": 1}, {"v": 2})
    store.put({"k": 2}, {"v": 3})
    assert len(path.read_text().splitlines()) == 3
    again = JsonLinesStore(path)
    assert again.get({"k": 1}) == {"v": 2} and again.get({"k": 2}) == {"v": 3} and again.skipped == 0
    assert JsonLinesStore(path, fresh=True).get({"k": 1}) is None


def test_unreadable_lines_are_skipped_counted_and_named_once(tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    store = JsonLinesStore(path)
    store.put({"k": 1}, {"v": 1})
    with path.open("ab") as f:
        f.write(b'{"id": "\xff\xfe", "value": {"v": 9}}\n')  # not UTF-8
        f.write(b"not json at all\n")
        f.write(b'{"id": "abc", "value": 5}\n')  # a value of the wrong shape
        f.write(b'["a", "list"]\n')
        f.write(b"\n")  # blank lines are nothing
    store.put({"k": 2}, {"v": 2})
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.lab.cache"):
        again = JsonLinesStore(path)
    assert again.skipped == 4 and again.get({"k": 1}) == {"v": 1} and again.get({"k": 2}) == {"v": 2}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(path) in warnings[0] and "skipped 4 unreadable line(s)" in warnings[0]


def test_a_line_cut_by_an_interrupted_write_is_dropped_quietly_and_not_glued_to_the_next(tmp_path, caplog):
    path = tmp_path / "cache.jsonl"
    JsonLinesStore(path).put({"k": 1}, {"v": 1})
    with path.open("a") as f:
        f.write('{"id": "cut sh')
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.lab.cache"):
        store = JsonLinesStore(path)
    assert store.skipped == 0 and not caplog.records
    store.put({"k": 2}, {"v": 2})
    again = JsonLinesStore(path)
    assert again.get({"k": 1}) == {"v": 1} and again.get({"k": 2}) == {"v": 2}
    assert again.skipped == 1  # the cut line is now an inner line: counted, the entries around it kept


def test_a_subclass_rejects_entries_of_the_wrong_shape(tmp_path):
    class Figures(JsonLinesStore):
        def accepts(self, key, value):
            return isinstance(value.get("x"), float)

    path = tmp_path / "cache.jsonl"
    plain = JsonLinesStore(path)
    plain.put({"k": 1}, {"x": 1.5})
    plain.put({"k": 2}, {"x": "text"})
    figures = Figures(path)
    assert figures.get({"k": 1}) == {"x": 1.5} and figures.get({"k": 2}) is None and figures.skipped == 1
