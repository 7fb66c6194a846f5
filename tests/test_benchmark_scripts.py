"""The benchmark scripts under ``benchmarks/`` in their smallest modes: they run, and their JSON holds sensible values.

Each runs as a subprocess (as a user runs it), on one thread, with tiny models, in a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_quant_benchmark_smallest(tmp_path, tiny_embedded_path):
    out = tmp_path / "quant.json"
    proc = run_script("quant.py", "--model", str(tiny_embedded_path), "--bits", "8", "--group-sizes", "0",
                      "--calib-samples", "2", "--eval-tokens", "2048", "--speed-small", "--runs", "1",
                      "--new-tokens", "4", "--threads", "1", "--out", str(out))
    r = json.loads(out.read_text())
    assert r["benchmark"] == "quant" and {"settings", "environment", "quality", "speed"} <= set(r)

    q = r["quality"]
    assert math.isfinite(q["dense_ppl"]) and q["dense_ppl"] > 1 and q["dense_file_bytes"] > 0
    assert [(x["method"], x["bits"], x["group_size"]) for x in q["runs"]] == [("rtn", 8, 0), ("gptq", 8, 0)]
    for x in q["runs"]:
        # 8-bit codes plus an fp16 scale (and a uint8 zero point for GPTQ's asymmetric grid) per row
        assert 8 < x["bits_per_weight"] < 9
        assert x["layer_ratio"] > 3.5  # float32 -> int8
        assert x["file_bytes"] < q["dense_file_bytes"]
        # the file shrinks by what the quantized layers shed; the rest (safetensors headers) is small
        shed = q["dense_file_bytes"] - x["file_bytes"]
        assert abs(shed - (x["layer_bytes_before"] - x["layer_bytes_after"])) < 0.01 * q["dense_file_bytes"]
        assert abs(x["ppl"] / q["dense_ppl"] - 1) < 0.05  # 8 bits barely moves perplexity
        assert "dequantized on the fly" in x["inference"]

    s = r["speed"]
    v = s["variants"]
    assert list(v) == ["dense", "int8", "int4"] and s["dtype"] == "float32"
    assert v["dense"]["file_ratio"] == 1 and v["dense"]["speed_ratio"] == 1
    assert v["dense"]["file_bytes"] > v["int8"]["file_bytes"] > v["int4"]["file_bytes"]
    assert v["int8"]["layer_ratio"] > 3.5 and v["int4"]["layer_ratio"] > 6
    assert v["int8"]["bits"] == 8 and v["int4"]["bits"] == 4 and v["int4"]["group_size"] == 32
    for row in v.values():
        assert row["tokens_per_s"] > 0 and len(row["times_s"]) == 1
    assert s["inference"]["int8"] == v["int8"]["inference"] and "dequantized on the fly" in v["int8"]["inference"]
    assert "inference, int4: dequantized on the fly" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [
    ("lowrank.py", ("--no-quality", "--speed-small")),
    ("structured.py", ("--small", "--models", "gpt2", "--ratios", "0.5")),
])
def test_decode_speed_benchmarks_smallest(tmp_path, script, args):
    out = tmp_path / "out.json"
    run_script(script, *args, "--runs", "1", "--new-tokens", "4", "--threads", "1", "--out", str(out))
    r = json.loads(out.read_text())
    rows = list(r["speed"]["variants"].values()) if script == "lowrank.py" else r["rows"]
    assert len(rows) == 2 and all(x["tokens_per_s"] > 0 and x["file_bytes"] > 0 for x in rows)
    assert rows[1]["file_bytes"] < rows[0]["file_bytes"]  # factored / pruned weights take less space
