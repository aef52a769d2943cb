from __future__ import annotations

import json

from pumer_lightning.data.throughput import main


def test_throughput_command_reports_rates(tiny_shapes, capsys):
    data = str(tiny_shapes / "nlvr2")
    assert main(["--data-dir", data, "--image-size", "64", "--workers", "0", "--seconds", "0.5",
                 "--batch-size", "8"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "64 px" in out and "examples/s" in out
    row = out.strip().splitlines()[-1].split()
    assert row[0] == "0" and float(row[1]) > 0 and float(row[3]) == float(row[1]) * 2  # 2 images per example
    assert main(["--data-dir", data, "--image-size", "64", "--workers", "1", "--seconds", "0.5", "--eval",
                 "--json", "--randaugment", "--family", "clip"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["workers"] == 1 and res["examples"] > 0 and res["examples_per_s_per_worker"] > 0
