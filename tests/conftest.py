"""Shared fixtures. Every test session gets its own cache directory (``EFFICIENTGPT_CACHE``) unless
``EFFICIENTGPT_TEST_CACHE`` names one to reuse between local runs; the embedded tiny model is
pretrained once per session into it."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["EFFICIENTGPT_CACHE"] = os.environ.get("EFFICIENTGPT_TEST_CACHE") or tempfile.mkdtemp(
    prefix="efficientgpt-test-cache-"
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread (no intra-op synchronisation); subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

FAMILIES = ("gpt2", "llama", "opt", "gpt_neox", "qwen2")
TESTS = Path(__file__).parent


@pytest.fixture(scope="session")
def tiny_embedded_path() -> Path:
    """Directory of the embedded:tiny model (pretrained once per session)."""
    from efficientgpt.models.embedded import PRESETS, ensure_embedded

    return ensure_embedded(PRESETS["tiny"], progress=False)


@pytest.fixture(scope="session")
def ascending_base():
    """A tiny Llama briefly pretrained on ascending sequences (``tests/adaptation.py``); copy before use."""
    from adaptation import ascending_model

    return ascending_model()


@pytest.fixture(scope="session")
def tiny_embedded(tiny_embedded_path):
    from efficientgpt.models.loading import load_model

    return load_model(str(tiny_embedded_path))


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600):
    """Run ``python -m efficientgpt ARGS`` in a subprocess; returns the CompletedProcess."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "efficientgpt", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"efficientgpt {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def survey_status(argv: list[str]) -> int:
    """Run ``efficientgpt survey ARGV`` in-process through the survey parser, the way the main CLI does
    (a ``UserError`` is printed as one line on stderr and gives exit status 1); the exit status."""
    import argparse

    from efficientgpt.errors import UserError
    from efficientgpt.survey import cli as survey_cli

    parser = argparse.ArgumentParser(prog="efficientgpt")
    survey_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["survey", *argv])
    try:
        return args.func(args)
    except UserError as err:
        print(f"efficientgpt survey: error: {err}", file=sys.stderr)
        return 1


def run_survey(argv: list[str], capsys) -> tuple[int, str, str]:
    """:func:`survey_status` with what it printed: (status, stdout, stderr)."""
    code = survey_status(argv)
    out = capsys.readouterr()
    return code, out.out, out.err
