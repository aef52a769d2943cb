"""`reduce/` imports nothing heavier than torch: the reducer can be lifted into another codebase alone."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("transformers", "lightning", "torchmetrics", "jsonargparse", "webdataset", "PIL")

PROBE = f"""
import importlib, pkgutil, sys
import pumer_lightning.reduce as reduce
for module in pkgutil.iter_modules(reduce.__path__):
    importlib.import_module("pumer_lightning.reduce." + module.name)
print(sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r})))
"""


def test_reduce_imports_nothing_heavier_than_torch():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]", out.stdout
