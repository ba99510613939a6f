"""httpx client for the broker's admin API.

Every request has explicit connect and read timeouts (``[broker] connect_timeout/read_timeout``).
Idempotent requests (GET, and POSTs the broker treats as idempotent: stop runner, recover) are
retried ``[broker] retries`` times with exponential backoff on connection failures, timeouts and
5xx answers; a 4xx is never retried. Every failure becomes one ``BrokerError`` line that says what
to fix: the URL, the timeout, or what the broker answered.

Endpoints (served by ``console.broker_sim``; a production broker exposes the same):

- ``GET  /health`` -> ``{"ok", "not_starting", "slow", "dispatcher", "runners": {state: n}}``
- ``GET  /admin/jobs`` -> ``{"jobs": [...]}``; ``GET /admin/runners`` -> ``{"runners": [...]}``
- ``POST /admin/runners/<id>/stop`` -> ``{"runner", "stopped", "requeued_job"}``
- ``POST /admin/recover`` ``{"thresholds": {...}, "dry_run": bool}`` ->
  ``{"released": [...], "requeued": [...], "dispatched": [...], "registered": [...], "notes": [...]}``
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from .config import Settings
from .errors import BrokerError

_BACKOFF_BASE = 0.2
_BACKOFF_MAX = 2.0


class BrokerClient:
    def __init__(self, url: str, *, connect_timeout: float = 3.0, read_timeout: float = 10.0,
                 retries: int = 2, transport: httpx.BaseTransport | None = None) -> None:
        if not url:
            raise BrokerError("broker.url is not set: add [broker] url = \"http://host:port\" to the config "
                              "(or use --via db to recover without the broker)")
        if not url.startswith(("http://", "https://")):
            raise BrokerError(f"broker.url {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.retries = max(0, int(retries))
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"User-Agent": "atc", "Accept": "application/json"},
                                  follow_redirects=False, trust_env=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> "BrokerClient":
        b = settings.broker
        return cls(b.url, connect_timeout=b.connect_timeout, read_timeout=b.read_timeout, retries=b.retries)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "BrokerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the API -----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def jobs(self) -> list[dict[str, Any]]:
        return self._list("GET", "/admin/jobs", "jobs")

    def runners(self) -> list[dict[str, Any]]:
        return self._list("GET", "/admin/runners", "runners")

    def stop_runner(self, runner_id: str) -> dict[str, Any]:
        return self._request("POST", f"/admin/runners/{runner_id}/stop", json_body={})

    def recover(self, thresholds: dict[str, float], *, dry_run: bool = False) -> dict[str, Any]:
        return self._request("POST", "/admin/recover", json_body={"thresholds": thresholds, "dry_run": dry_run})

    # -- transport ---------------------------------------------------------------------------------

    def _list(self, method: str, path: str, key: str) -> list[dict[str, Any]]:
        data = self._request(method, path)
        items = data.get(key)
        if not isinstance(items, list):
            raise BrokerError(f"broker at {self.url} answered {method} {path} without a {key!r} list "
                              f"(is broker.url pointing at the broker?)")
        return items

    def _request(self, method: str, path: str, *, json_body: Any = None) -> dict[str, Any]:
        what = f"{method} {path}"
        attempts = self.retries + 1
        last: BrokerError | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** (attempt - 1)))
            try:
                response = self._http.request(method, path, json=json_body)
            except httpx.ConnectError as exc:
                last = BrokerError(f"broker at {self.url} refused or could not take the connection for {what} "
                                   f"({_reason(exc)}); is it running? check broker.url"
                                   f"{_after(attempt)} -- or recover with --via db")
                continue
            except httpx.ConnectTimeout:
                last = BrokerError(f"broker at {self.url} did not accept a connection within "
                                   f"broker.connect_timeout={self.connect_timeout:g}s for {what}{_after(attempt)}")
                continue
            except httpx.ReadTimeout:
                last = BrokerError(f"broker at {self.url} did not answer {what} within "
                                   f"broker.read_timeout={self.read_timeout:g}s{_after(attempt)}")
                continue
            except httpx.HTTPError as exc:
                last = BrokerError(f"broker at {self.url}: {what} failed: {_reason(exc)}{_after(attempt)}")
                continue
            if response.status_code >= 500:
                last = BrokerError(f"broker at {self.url} failed on {what}: HTTP {response.status_code} "
                                   f"{_snippet(response.text)}{_after(attempt)}")
                continue
            if response.status_code >= 400:
                raise BrokerError(f"broker at {self.url} rejected {what}: HTTP {response.status_code} "
                                  f"{_snippet(response.text)}")
            return self._decode(response, what)
        assert last is not None
        raise last

    def _decode(self, response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            data = json.loads(response.content)
        except ValueError:
            raise BrokerError(f"broker at {self.url} answered {what} with something that is not JSON "
                              f"({_snippet(response.text)!s}); is broker.url pointing at the broker?") from None
        if not isinstance(data, dict):
            raise BrokerError(f"broker at {self.url} answered {what} with JSON that is not an object")
        return data


def _after(attempt: int) -> str:
    return f" (after {attempt + 1} attempts)" if attempt else ""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]


def _snippet(text: str, limit: int = 80) -> str:
    from .text import one_line

    return repr(one_line(text or "", limit))
