"""``survey check-links``: find dead, unreachable and moved links.

Each URL gets a HEAD request (cheap: no body), retried as GET when the server answers 405 or 501
because some servers do not implement HEAD. Redirects are followed by hand so the report can say
where a link now points. Timeouts, connection errors, 429 and 5xx answers are retried with
exponential backoff; other 4xx answers are final. Results that did not fail are cached in a JSON
file for ``ttl`` seconds so repeated runs stay fast and polite; failed links are always re-checked.

Statuses:

``ok``          2xx without redirects
``redirected``  2xx after one or more redirects (``final_url`` says where)
``blocked``     401/403/429 after retries: the server refused the checker; the link may still work
``dead``        the server answered 404, 410 or any other 4xx/5xx, or redirected in circles
``unreachable`` no answer at all after retries: a timeout, a refused connection or an unknown host

A host that never answers may be gone for good, but a machine without network sees every link so,
which is why ``unreachable`` is kept apart from ``dead``. Neither is cached.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from efficientgpt.survey.schema import Paper

USER_AGENT = "efficientgpt-survey-check-links/0.1"
DEFAULT_TTL = 7 * 24 * 3600
MAX_REDIRECTS = 10
STATUSES = ("ok", "redirected", "blocked", "dead", "unreachable")
FAILED = ("dead", "unreachable")
"""Statuses that fail the check and are never cached."""


@dataclasses.dataclass(frozen=True)
class LinkResult:
    """The outcome of checking one URL."""

    url: str
    status: str
    """One of :data:`STATUSES`."""
    code: int | None = None
    """Final HTTP status code; ``None`` when no response arrived."""
    final_url: str | None = None
    """Where the redirects ended (only for ``redirected``)."""
    error: str | None = None
    """Why the link is dead, unreachable or blocked, in words."""
    method: str = "HEAD"
    """The request method that produced the final answer."""
    checked_at: float = 0.0
    """Unix time of the check (used for the cache TTL)."""
    cached: bool = False
    """True when the result came from the cache."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_cache_path() -> Path:
    """``$EFFICIENTGPT_CACHE/survey-links.json``, else ``~/.cache/efficientgpt/survey-links.json``."""
    root = os.environ.get("EFFICIENTGPT_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "efficientgpt"
    return base / "survey-links.json"


def links_of(papers: Iterable[Paper]) -> dict[str, list[str]]:
    """Every distinct URL an entry links to, with the ids of the papers that use it, in order."""
    out: dict[str, list[str]] = {}
    for p in papers:
        for url in (p.paper_url, p.code):
            if url and p.id not in out.setdefault(url, []):
                out[url].append(p.id)
    return out


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hand redirects back to the caller, which follows them itself to record the chain."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 - urllib API
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _request(url: str, method: str, timeout: float) -> tuple[int, str | None]:
    """One request: (status code, Location header for redirects)."""
    req = urllib.request.Request(url, method=method, headers={"User-Agent": USER_AGENT, "Accept": "*/*"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Location")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers.get("Location") if err.headers else None


def check_url(url: str, timeout: float = 10.0, retries: int = 2, backoff: float = 0.5) -> LinkResult:
    """Check one URL, following redirects and retrying transient failures."""
    attempt = 0
    while True:
        result = _check_once(url, timeout)
        transient = result.code is None or result.code == 429 or (result.code or 0) >= 500 and result.code != 501
        if result.status in ("ok", "redirected") or not transient or attempt >= retries:
            return result
        time.sleep(backoff * (2**attempt))
        attempt += 1


def _check_once(url: str, timeout: float) -> LinkResult:
    current, method, hops = url, "HEAD", 0
    while True:
        try:
            code, location = _request(current, method, timeout)
            if code in (405, 501) and method == "HEAD":
                method = "GET"
                code, location = _request(current, method, timeout)
        except (TimeoutError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            return LinkResult(url, "unreachable", None, None, f"{type(err).__name__}: {reason}", method,
                              time.time())
        if code in (301, 302, 303, 307, 308) and location:
            hops += 1
            if hops > MAX_REDIRECTS:
                return LinkResult(url, "dead", code, current, f"more than {MAX_REDIRECTS} redirects",
                                  method, time.time())
            current = urljoin(current, location)
            continue
        now = time.time()
        if 200 <= code < 300:
            if current != url:
                return LinkResult(url, "redirected", code, current, None, method, now)
            return LinkResult(url, "ok", code, None, None, method, now)
        status = "blocked" if code in (401, 403, 429) else "dead"
        return LinkResult(url, status, code, current if current != url else None, f"HTTP {code}", method, now)


def load_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a missing or corrupt cache only costs a re-check
    return data if isinstance(data, dict) else {}


def save_cache(path: Path, cache: dict[str, dict[str, Any]]) -> None:
    from efficientgpt.survey.store import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")


def check_links(
    urls: Sequence[str],
    *,
    timeout: float = 10.0,
    retries: int = 2,
    backoff: float = 0.5,
    workers: int = 16,
    cache_path: Path | None = None,
    ttl: float = DEFAULT_TTL,
) -> list[LinkResult]:
    """Check ``urls`` concurrently; results come back in the order of ``urls``."""
    cache = load_cache(cache_path) if cache_path else {}
    now = time.time()
    results: dict[str, LinkResult] = {}
    todo = []
    for url in dict.fromkeys(urls):
        hit = cache.get(url)
        if isinstance(hit, dict) and now - float(hit.get("checked_at", 0)) < ttl and hit.get("status") not in FAILED:
            fields = {f.name for f in dataclasses.fields(LinkResult)}
            results[url] = LinkResult(**{k: v for k, v in hit.items() if k in fields and k != "cached"}, cached=True)
        else:
            todo.append(url)
    if todo:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            futures = {url: pool.submit(check_url, url, timeout, retries, backoff) for url in todo}
            for url, fut in futures.items():
                results[url] = fut.result()
    if cache_path is not None:
        for url in todo:
            res = results[url]
            if res.status in FAILED:
                cache.pop(url, None)
            else:
                cache[url] = {k: v for k, v in res.to_dict().items() if k != "cached"}
        save_cache(cache_path, cache)
    return [results[url] for url in dict.fromkeys(urls)]
