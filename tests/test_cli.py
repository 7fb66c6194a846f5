"""The acceptance commands of the foundation, exactly as a user types them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli


def test_help_lists_the_commands():
    out = run_cli("--help").stdout
    for cmd in ("run", "pretrain", "eval", "methods", "survey"):
        assert cmd in out
    for cmd in ("pretrain", "eval", "methods", "run"):
        assert "examples:" in run_cli(cmd, "--help").stdout


def test_methods_json():
    data = json.loads(run_cli("methods", "--json").stdout)
    assert data["count"] == len(data["methods"])
    for m in data["methods"]:
        assert {"name", "family", "paper", "summary"} <= set(m)


def test_pretrain_and_eval_tiny(tiny_embedded_path):
    res = json.loads(run_cli("pretrain", "--model", "embedded:tiny", "--json").stdout)
    assert res["path"] == str(tiny_embedded_path) and res["cached"] is True
    for domain in ("prose", "code"):
        proc = run_cli("eval", "--model", "embedded:tiny", "--data", f"embedded:{domain}", "--json",
                       "--max-tokens", "20000")
        ev = json.loads(proc.stdout)  # stdout is exactly one JSON object
        assert 1 < ev["perplexity"] < 4096 and ev["data"]["spec"] == f"embedded:{domain}"
        assert ev["model"]["path"] == str(tiny_embedded_path)


def test_pretrain_into_out_dir(tmp_path, tiny_embedded_path):
    out = tmp_path / "m"
    res = json.loads(run_cli("pretrain", "--model", "embedded:tiny", "--steps", "3", "--out", str(out),
                             "--json", "--no-progress").stdout)
    assert res["path"] == str(out) and res["steps"] == 3
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    ev = json.loads(run_cli("eval", "--model", str(out), "--data", "embedded:prose", "--json").stdout)
    assert ev["perplexity"] > 0


def test_errors_exit_1_with_a_message(tmp_path):
    proc = run_cli("eval", "--model", str(tmp_path), "--json", check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "has no config.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("pretrain", "--model", "gpt2", check=False)
    assert proc.returncode == 1 and "pretrain trains an embedded preset" in proc.stderr
    proc = run_cli("eval", "--model", "embedded:tiny", "--data", str(tmp_path / "x.txt"), check=False)
    assert proc.returncode == 1 and "is not a file or directory" in proc.stderr


@pytest.mark.slow
def test_torchrun_pretrain_acceptance(tmp_path, tiny_embedded_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    proc = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", str(29700 + os.getpid() % 200), "-m",
         "efficientgpt", "pretrain", "--model", "embedded:tiny", "--out", str(out), "--json", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1  # rank 0 alone prints
    res = json.loads(lines[0])
    assert res["world_size"] == 2 and res["path"] == str(out)
    assert (out / "model.safetensors").exists()
    single = json.loads((tiny_embedded_path / "efficientgpt_pretrain.json").read_text())
    assert res["final_train_loss"] == pytest.approx(single["train"]["final_loss"], abs=1e-4)


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "efficientgpt", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "efficientgpt" in proc.stdout


def test_a_closed_pipe_ends_quietly():
    # `efficientgpt survey list | head -1`: the reader is gone before the listing is written.
    proc = subprocess.Popen([sys.executable, "-m", "efficientgpt", "survey", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err, err
