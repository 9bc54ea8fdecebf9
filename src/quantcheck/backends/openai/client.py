"""One OpenAI-compatible server as a client sees it: the API key only in a header, bounded retries with backoff for
transient faults (408, 425, 429, 5xx, timeouts, dropped connections), and every fault as one line."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

from quantcheck.errors import QuantcheckError

if TYPE_CHECKING:
    import httpx

API_KEY_VARIABLES = ("QUANTCHECK_API_KEY", "OPENAI_API_KEY")
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRIES = 4
"""Tries after the first for a transient fault: waits of 1, 2, 4, 8 s (15 s) before giving up."""
RUN_ADVICE = "finished work is kept: run the same command again once the server is back"
BACKOFF_S = 1.0
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0
"""A full-vocabulary row is ~2 MB of JSON (1-3 s on 2 CPU cores); queued behind others it takes longer."""
MAX_CONCURRENCY = 8
"""Single-prompt requests in flight at once (generation, cost): enough to fill a server's batch, bounded for shared
servers."""


class EndpointError(QuantcheckError):
    """A server fault or refusal, in one line; `status` is the HTTP status of a refusal."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def api_key() -> str | None:
    return next((os.environ[name] for name in API_KEY_VARIABLES if os.environ.get(name)), None)


def one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def server_message(response: httpx.Response) -> str:
    """The server's error message (OpenAI's {"error": {"message"}} or vLLM's {"message"}), else the body."""
    try:
        body = response.json()
    except ValueError:
        return one_line(response.text) or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return one_line(str(message))
    return one_line(response.text)


def transport_reason(error: Exception) -> str:
    import httpx

    if isinstance(error, httpx.TimeoutException):
        return (
            f"no answer within {READ_TIMEOUT_S:.0f} s"
            if isinstance(error, httpx.ReadTimeout)
            else "connection timed out"
        )
    if isinstance(error, httpx.ConnectError):
        return (
            "connection refused" if "refused" in str(error).lower() else f"cannot connect ({one_line(str(error), 120)})"
        )
    if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "the server closed the connection mid-request"
    return f"{type(error).__name__}: {one_line(str(error), 120)}"


class Client:
    """One server: httpx with the API key header, bounded retries with backoff, one-line errors."""

    def __init__(self, url: str, retries: int = RETRIES, advice: str = RUN_ADVICE) -> None:
        import httpx

        self.url = url
        self.retries = retries
        self.advice = advice
        key = api_key()
        self.http = httpx.Client(
            base_url=url + "/",
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=MAX_CONCURRENCY),
            follow_redirects=False,
        )

    @property
    def root(self) -> str:
        """The server's root, where vLLM and SGLang answer /version and /tokenize (outside /v1)."""
        return self.url.removesuffix("/v1")

    def request(self, method: str, path: str, payload: dict[str, object] | None = None) -> dict:
        """The JSON answer; transient faults are retried, anything else raises at once."""
        import httpx

        start, reason = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                response = self.http.request(method, path, json=payload)
            except httpx.TransportError as error:
                reason = transport_reason(error)
                continue
            if response.status_code in TRANSIENT_STATUS:
                reason = f"HTTP {response.status_code}: {server_message(response)}"
                continue
            if response.status_code >= 400:
                hint = (
                    " (the base URL of an OpenAI-compatible API usually ends in /v1)"
                    if response.status_code == 404
                    else ""
                )
                raise EndpointError(
                    f"{self.url}/{path} answered HTTP {response.status_code}: {server_message(response)}{hint}",
                    response.status_code,
                )
            try:
                return response.json()
            except ValueError:
                raise EndpointError(
                    f"{self.url}/{path} did not answer JSON: is {self.url} the base URL of an OpenAI-compatible API "
                    "(usually ending in /v1)?"
                ) from None
        tries = f"{self.retries + 1} tries over {time.monotonic() - start:.0f} s"
        raise EndpointError(f"{self.url}: {reason} ({tries}); {self.advice}")

    def completions(self, payload: dict[str, object], count: int = 1) -> list[dict]:
        """The `count` choices of `POST /completions` (one per prompt), in prompt order; one line when they are not
        there."""
        answer = self.request("POST", "completions", payload)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != count:
            raise EndpointError(
                f"{self.url}/completions answered {len(choices) if isinstance(choices, list) else 'no'} choices "
                f"for {count} prompts: {one_line(json.dumps(answer), 200)}"
            )
        return sorted(choices, key=lambda choice: choice.get("index", 0))

    def close(self) -> None:
        self.http.close()
