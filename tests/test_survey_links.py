"""``survey check-links`` against a local HTTP server on 127.0.0.1 (never any other address)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import survey_status
from efficientgpt.survey import links

SLOW_SECONDS = 1.0
TIMEOUT = 0.3


class Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):  # keep test output quiet
        pass

    def _answer(self, head: bool) -> None:
        path = self.path
        Handler.hits[f"{self.command} {path}"] = Handler.hits.get(f"{self.command} {path}", 0) + 1
        if path == "/slow":
            time.sleep(SLOW_SECONDS)
        if path == "/missing":
            code, location = 404, None
        elif path == "/moved":
            code, location = 301, "/ok"
        elif path == "/nohead" and head:
            code, location = 405, None
        elif path == "/flaky" and Handler.hits[f"{self.command} {path}"] == 1:
            code, location = 503, None
        elif path == "/forbidden":
            code, location = 403, None
        else:
            code, location = 200, None
        self.send_response(code)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", "2")
        self.end_headers()
        if not head:
            self.wfile.write(b"ok")

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)


@pytest.fixture
def server():
    Handler.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_statuses(server):
    urls = [f"{server}/{p}" for p in ("ok", "missing", "moved", "nohead", "slow", "flaky", "forbidden")]
    started = time.monotonic()
    got = {r.url.rsplit("/", 1)[1]: r for r in
           links.check_links(urls, timeout=TIMEOUT, retries=1, backoff=0.01, workers=8)}
    assert time.monotonic() - started < 3 * SLOW_SECONDS  # concurrent, and the timeout cut the slow one
    assert (got["ok"].status, got["ok"].code, got["ok"].method) == ("ok", 200, "HEAD")
    assert (got["missing"].status, got["missing"].code, got["missing"].error) == ("dead", 404, "HTTP 404")
    assert (got["moved"].status, got["moved"].final_url) == ("redirected", f"{server}/ok")
    assert (got["nohead"].status, got["nohead"].method) == ("ok", "GET")
    assert got["slow"].status == "unreachable" and got["slow"].code is None and "timed out" in got["slow"].error
    assert got["flaky"].status == "ok" and Handler.hits["HEAD /flaky"] == 2  # retried after the 503
    assert got["forbidden"].status == "blocked"
    assert Handler.hits["HEAD /missing"] == 1  # a 404 is final: no retries


def test_cache_skips_fresh_results_and_rechecks_dead_ones(server, tmp_path):
    cache = tmp_path / "cache" / "links.json"
    urls = [f"{server}/ok", f"{server}/missing"]
    links.check_links(urls, timeout=TIMEOUT, retries=0, cache_path=cache)
    stored = json.loads(cache.read_text(encoding="utf-8"))
    assert list(stored) == [f"{server}/ok"]  # dead links are never cached
    again = links.check_links(urls, timeout=TIMEOUT, retries=0, cache_path=cache)
    assert [r.cached for r in again] == [True, False]
    assert Handler.hits["HEAD /ok"] == 1 and Handler.hits["HEAD /missing"] == 2
    expired = links.check_links(urls, timeout=TIMEOUT, retries=0, cache_path=cache, ttl=0)
    assert not expired[0].cached and Handler.hits["HEAD /ok"] == 2


def check_links_cli(papers, *argv) -> int:
    """``efficientgpt survey check-links --papers PAPERS ARGV`` through the survey parser; the exit status."""
    return survey_status(["check-links", "--papers", str(papers), "--timeout", str(TIMEOUT), "--retries", "0",
                          *argv])


def test_cli_reports_and_exits_1_on_dead_links(server, tmp_path, capsys, monkeypatch):
    papers = tmp_path / "papers.yaml"
    papers.write_text(f"""\
papers:
  - id: good-paper
    title: "Good Paper"
    venue: ICLR
    year: 2020
    categories: [pruning]
    url: {server}/ok
    code: {server}/moved

  - id: bad-paper
    title: "Bad Paper"
    venue: ICLR
    year: 2021
    categories: [pruning]
    url: {server}/missing
""", encoding="utf-8")
    monkeypatch.setenv("EFFICIENTGPT_CACHE", str(tmp_path / "cachedir"))

    def run(*argv):
        return check_links_cli(papers, *argv)

    assert run("--json") == 1
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert data["counts"] == {"ok": 1, "redirected": 1, "blocked": 0, "dead": 1, "unreachable": 0}
    assert {r["url"]: r["papers"] for r in data["links"]}[f"{server}/missing"] == ["bad-paper"]
    assert data["cache"] == str(tmp_path / "cachedir" / "survey-links.json")
    assert (tmp_path / "cachedir" / "survey-links.json").exists()
    assert run("good-paper", "--no-cache") == 0
    human = capsys.readouterr().out
    assert f"redirected {server}/moved (good-paper) -> {server}/ok" in human
    assert "1 ok, 1 redirected, 0 blocked, 0 dead, 0 unreachable" in human


def test_no_answer_is_unreachable_not_dead_and_is_not_cached(tmp_path, capsys, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on: the connection is refused
        sock.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{sock.getsockname()[1]}/paper"
    cache = tmp_path / "links.json"
    (res,) = links.check_links([nobody], timeout=TIMEOUT, retries=1, backoff=0.01, cache_path=cache)
    assert (res.status, res.code) == ("unreachable", None) and "refused" in res.error.lower()
    assert json.loads(cache.read_text(encoding="utf-8")) == {}

    papers = tmp_path / "papers.yaml"
    papers.write_text(f'papers:\n  - {{id: lost-paper, title: "Lost Paper", venue: ICLR, year: 2020, '
                      f'categories: [pruning], url: "{nobody}"}}\n', encoding="utf-8")
    assert check_links_cli(papers, "--no-cache") == 1
    human = capsys.readouterr().out
    assert "0 dead, 1 unreachable" in human and "may have no network access" in human


def test_links_of_collects_each_url_once():
    from efficientgpt.survey.schema import Paper

    a = Paper(id="a", title="A", year=2020, categories=("pruning",), arxiv="2001.00001", code="https://x.org/c")
    b = Paper(id="b", title="B", year=2021, categories=("pruning",), code="https://x.org/c")
    assert links.links_of([a, b]) == {"https://arxiv.org/abs/2001.00001": ["a"], "https://x.org/c": ["a", "b"]}
