"""Whether the Hugging Face hub can be reached from this machine, asked once per process.

``huggingface_hub`` retries a failed connection five times with exponential back-off, so on a
machine without network a hub id costs most of a minute of retries before its error. One TCP
connect to the hub endpoint with a short timeout answers the same question at once. When the hub
cannot be reached, a hub id resolves to its snapshot in the local Hugging Face cache
(:func:`source_for`), and one that is not cached fails at once with an error that says why.

Nothing is probed when the user already chose offline mode (``HF_HUB_OFFLINE``), because the
libraries then never touch the network; nor behind a proxy, which a direct connect cannot judge.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlsplit

_TRUE = {"1", "on", "yes", "true"}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def endpoint() -> str:
    """The hub's base URL (``HF_ENDPOINT``, default https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_mode() -> bool:
    """The user asked the Hugging Face libraries to stay off the network."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def unreachable() -> bool:
    """True when online mode would only retry into a dead network (see the module docstring)."""
    if offline_mode() or any(os.environ.get(v) for v in _PROXY_VARS):
        return False
    return not _connects(endpoint())


@functools.lru_cache(maxsize=4)
def _connects(url: str, timeout: float = 3.0) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname or "", port), timeout=timeout):
                answer.append(True)
        except OSError:  # name resolution failed, refused, unreachable or timed out
            answer.append(False)

    # The socket timeout does not bound the name lookup, so a resolver that hangs is cut off here.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(2 * timeout)
    return bool(answer and answer[0])


def unreachable_reason() -> str:
    return f"the Hugging Face hub ({endpoint()}) cannot be reached from this machine"


class NotCachedError(OSError):
    """A hub id that is not in the local cache, on a machine that cannot reach the hub."""


def source_for(repo_id: str) -> str:
    """What ``from_pretrained`` should load for the hub id ``repo_id``: the id itself, or, where the hub
    cannot be reached, the local directory of its cached snapshot (its ``main`` revision).

    Loading from that directory touches no network at all; passing ``local_files_only`` to
    ``from_pretrained`` is not enough, because some of transformers' side lookups (the adapter
    config) still go online. Raises :class:`NotCachedError` when there is neither hub nor snapshot.
    """
    if not unreachable():
        return repo_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or a malformed id: either way there is no snapshot
        raise NotCachedError(f"it is not in the local Hugging Face cache and {unreachable_reason()}") from None
