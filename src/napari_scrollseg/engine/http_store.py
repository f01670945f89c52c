"""zarr over http(s) that neither hangs on a silent server nor gives up on one hiccup.

fsspec's HTTP filesystem sets no read timeout: a server that accepts the connection
and never answers blocks a read forever. :func:`open_http_store` gives every read a
connect and a read timeout (``SCROLLSEG_HTTP_TIMEOUT`` seconds, default
:data:`READ_TIMEOUT_S`), retries transient failures (timeouts, dropped connections,
5xx answers) ``SCROLLSEG_HTTP_RETRIES`` times with exponential backoff, and then
raises one :class:`ScrollsegError` naming the URL.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from zarr.storage import FsspecStore

from napari_scrollseg.engine.errors import ScrollsegError

CONNECT_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 60.0
RETRIES = 3
BACKOFF_S = 0.5


def _setting(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise ScrollsegError(f"{name} must be a number of seconds / tries") from None


class RetryingHttpStore(FsspecStore):
    """An :class:`~zarr.storage.FsspecStore` whose reads retry, then fail clearly."""

    retries: int = RETRIES
    timeout_s: float = READ_TIMEOUT_S

    async def _retry(self, key: str, call: Callable[[], Awaitable[Any]]) -> Any:
        url = f"{self.path.rstrip('/')}/{key}" if key else self.path
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except aiohttp.ClientResponseError as exc:
                if exc.status < 500:
                    raise ScrollsegError(
                        f"{url} answered HTTP {exc.status} ({exc.message}); check the address "
                        "and your access"
                    ) from None
                reason = f"HTTP {exc.status}"
            except (TimeoutError, asyncio.TimeoutError):
                reason = f"no answer within {self.timeout_s:g} s"
            except (aiohttp.ClientError, ConnectionError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if attempt < self.retries:
                await asyncio.sleep(BACKOFF_S * 2**attempt)
        raise ScrollsegError(
            f"cannot read {url}: {reason} ({self.retries + 1} tries); check the network and "
            "the server, then run again (a prediction resumes where it stopped)"
        )

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return await self._retry(key, lambda: FsspecStore.get(self, key, prototype, byte_range))

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        key = key_ranges[0][0] if key_ranges else ""
        return await self._retry(
            key, lambda: FsspecStore.get_partial_values(self, prototype, key_ranges)
        )

    async def exists(self, key: str) -> bool:
        return await self._retry(key, lambda: FsspecStore.exists(self, key))


def open_http_store(url: str) -> RetryingHttpStore:
    """A read-only zarr store for an http(s) URL with timeouts and bounded retries."""
    read_s = _setting("SCROLLSEG_HTTP_TIMEOUT", READ_TIMEOUT_S)
    retries = int(_setting("SCROLLSEG_HTTP_RETRIES", RETRIES))
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=min(CONNECT_TIMEOUT_S, read_s), sock_read=read_s
    )
    store = RetryingHttpStore.from_url(
        url, storage_options={"client_kwargs": {"timeout": timeout}}, read_only=True
    )
    store.retries, store.timeout_s = max(0, retries), read_s
    return store
