"""`pumer_lightning.lab.report`: percentages, Markdown tables, a record's header."""

from __future__ import annotations

import math

import pytest

from pumer_lightning.lab.report import pct, record_header, table


def test_pct_formats_fractions_differences_and_missing_values():
    assert pct(0.8123, 0.0151) == "81.2 ± 1.5"
    assert pct(-0.0042, 0.003, sign=True) == "-0.4 ± 0.3"
    assert pct(0.0, 0.0, sign=True) == "+0.0 ± 0.0"
    assert pct(0.25, suffix="%") == "25.0%"
    assert pct(-1.25, 0.5, sign=True, scale=1) == "-1.2 ± 0.5"  # already in points
    assert pct(0.5, digits=2) == "50.00"
    assert pct(None) == pct(math.nan) == "n/a" and pct(0.5, math.nan) == "50.0 ± n/a"


def test_table_renders_header_rule_and_rows():
    assert table(["a", "b %"], [["x", 1], ["y", pct(0.5)]]) == [
        "| a | b % |",
        "|---|---|",
        "| x | 1 |",
        "| y | 50.0 |",
    ]
    with pytest.raises(ValueError, match="a row has 1 cells for 2 columns"):
        table(["a", "b"], [["only"]])


def test_record_header_names_the_schema_and_the_command():
    header = record_header("pumer-lightning/x/v1", "python -m pumer_lightning.x", ["--budget", "quick"])
    assert header["schema"] == "pumer-lightning/x/v1"
    assert header["command"] == "python -m pumer_lightning.x --budget quick"
    assert header["created"].endswith("+00:00")
