"""Loading from the hub on a machine that cannot reach it: the local cache, or a clear error at once."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from conftest import run_cli
from efficientgpt import hub
from efficientgpt.errors import UserError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
                "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dead_hub(monkeypatch):
    """An endpoint that refuses connections, with the user's offline switches cleared."""
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    hub._connects.cache_clear()
    yield url
    hub._connects.cache_clear()


def test_reachability_probe(dead_hub, monkeypatch):
    assert hub.unreachable()
    with socket.socket() as server:  # a listening endpoint is reachable
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}/")
        assert not hub.unreachable()
    monkeypatch.setenv("HF_ENDPOINT", dead_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline by choice: the libraries never go online
    assert not hub.unreachable()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # a proxy cannot be judged directly
    assert not hub.unreachable()


def test_a_hanging_name_lookup_counts_as_unreachable(monkeypatch):
    import threading

    release = threading.Event()

    def lookup_that_hangs(*args, **kwargs):
        release.wait(30)
        raise OSError("name resolution gave up")

    monkeypatch.setattr(hub.socket, "create_connection", lookup_that_hangs)
    try:
        assert hub._connects.__wrapped__("https://hub.invalid", timeout=0.05) is False
    finally:
        release.set()


def test_uncached_hub_id_fails_at_once_saying_why(dead_hub):
    from efficientgpt.models.loading import load_model

    with pytest.raises(UserError, match=r"could not load model 'no-such-org/no-such-model' \(hub id\): it is not "
                                         r"in the local Hugging Face cache and the Hugging Face hub "
                                         r"\(http://127\.0\.0\.1:\d+\) cannot be reached"):
        load_model("no-such-org/no-such-model")


def test_hub_dataset_fails_at_once_naming_the_offline_switch(dead_hub):
    from efficientgpt.data.sources import require_hub

    with pytest.raises(UserError, match=r"dataset 'hf:wikitext' needs the hub, but .* set HF_HUB_OFFLINE=1"):
        require_hub("dataset 'hf:wikitext'")


def test_cached_hub_model_loads_without_network(tmp_path, tiny_embedded_path):
    # The layout huggingface_hub writes: models--OWNER--NAME/{refs/main, snapshots/REVISION/...}.
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--efficientgpt-test--tiny"
    shutil.copytree(tiny_embedded_path, repo / "snapshots" / revision,
                    ignore=shutil.ignore_patterns("checkpoints", "*.jsonl"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    env = {var: "" for var in OFFLINE_VARS}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    out = run_cli("eval", "--model", "efficientgpt-test/tiny", "--data", str(text), "--json", env=env, timeout=120)
    result = json.loads(out.stdout)
    assert result["model"]["spec"] == "efficientgpt-test/tiny" and result["perplexity"] > 1
