"""Reporting: percentages, Markdown tables from rows, and the header every run record starts with.

```python
pct(0.8123, 0.0151)              # '81.2 ± 1.5'
pct(-0.0042, 0.003, sign=True)   # '-0.4 ± 0.3'   (a difference, in points)
pct(0.25, suffix="%")            # '25.0%'
pct(None)                        # 'n/a'
table(["setting", "acc %"], [["baseline", "81.2 ± 1.5"]])
# ['| setting | acc % |', '|---|---|', '| baseline | 81.2 ± 1.5 |']
```
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

MISSING = "n/a"


def pct(
    value: float | None,
    se: float | None = None,
    *,
    sign: bool = False,
    suffix: str = "",
    digits: int = 1,
    scale: float = 100.0,
) -> str:
    """``value`` (a fraction) in percent or points, ``± se`` when given; `MISSING` for None or NaN.

    ``sign``: always print the sign (differences); ``scale=1``: the value is in points already.
    """
    if value is None or math.isnan(value):
        return MISSING
    text = f"{scale * value:{'+' if sign else ''}.{digits}f}{suffix}"
    if se is None:
        return text
    return f"{text} ± {MISSING if math.isnan(se) else f'{scale * se:.{digits}f}'}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table: the header, its rule and one line per row (cells as ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"a row has {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def record_header(schema: str, prog: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The first fields of a run's JSON record: schema, creation time (UTC) and the command that made it."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "schema": schema,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([prog, *args]),
    }
