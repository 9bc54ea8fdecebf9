"""The openai backend: a model behind an OpenAI-compatible server (vLLM, SGLang, TGI, llama-server).

quantcheck neither starts nor stops the server; it sends the reference's token ids as the prompt of
`POST /v1/completions` (a list of ints is a valid prompt), so every model sees identical ids.

- Next-token rows: one request per batch (a list of token-id prompts), `max_tokens: 1,
  temperature: 0, logprobs: -1` (the whole vocabulary, from vLLM started with `--max-logprobs -1`)
  and `return_tokens_as_token_ids: true`, which keys entries `token_id:N` (keyed by text, distinct
  tokens with the same text collide). A server that refuses the full vocabulary is asked for the
  top 20, then the top 5 (OpenAI's limits); with top-K rows KL is only a lower bound
  (`metrics.next_token.kl_lower_bound`).
- Generation: one request per item with the run's explicit settings, `stop_token_ids` and
  `return_token_ids` (vLLM's extra fields), every sampling knob sent, so the server's own defaults
  (vLLM applies the model's generation_config.json) never apply.
- Cost: what a client sees, streaming at each concurrency level (`quantcheck.backends.openai.serving`);
  the server's memory is not visible from here and is reported as not measured.

Everything the server can get wrong (wrong URL, wrong model name, no log-probabilities) is
probed in the parent before any work (`connect`); every row after the probe is checked again (a row
with fewer entries than asked stops the model in one line, `_check_row`). The server's own tokenizer
is checked on a few prompts by its /tokenize, else by a completion that echoes the prompt sent as text;
where neither answers, the model's `EngineInfo.tokenizer_verified` is False and the run says so. Transient faults
(timeouts, refused connections, 408/429/5xx) are retried with exponential backoff a bounded number of times; then
the worker stops with one line and the run keeps every finished batch. The API key comes from the environment
(QUANTCHECK_API_KEY, else OPENAI_API_KEY) and is only ever put in a request header.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np

from quantcheck.backends.base import Backend, MethodInfo
from quantcheck.backends.openai.client import (
    API_KEY_VARIABLES,
    CONNECT_TIMEOUT_S,
    MAX_CONCURRENCY,
    RUN_ADVICE,
    Client,
    EndpointError,
    transport_reason,
)
from quantcheck.errors import QuantcheckError
from quantcheck.schema.models import TEXT_TOP_LOGPROBS, Endpoint
from quantcheck.schema.results import WeightPlan

if TYPE_CHECKING:
    from pydantic import BaseModel

    from quantcheck.models.plan import ModelShape
    from quantcheck.schema.models import Calibration, ModelSpec
    from quantcheck.schema.results import EngineInfo, GenerationSettings, ModelCost

PREFIX = "url"
SYNTAX = f"{PREFIX}:URL[#MODEL][?top_logprobs=K][&weight_gb=G][&prompt_logprobs=K|all]"
OPTIONS = {
    "top_logprobs": "K: the server returns only the top K log-probabilities (KL is then a lower bound)",
    "weight_gb": "G: the served model's weight memory in GiB, as you know it (a server's memory is not visible here)",
    "prompt_logprobs": "K or all: text and prompts runs ask for the top K at every token "
    f"(default {TEXT_TOP_LOGPROBS}, KL a lower bound; all: full rows, about 1.9 MB of JSON each)",
}
FALLBACK_TOP_LOGPROBS = (20, 5)
"""Asked for in turn when a server refuses the full vocabulary: OpenAI's chat and legacy limits."""
PROBE_RETRIES = 1
PROBE_ADVICE = "is a server listening at that address?"
PROBE_PROMPT = [1, 2, 3]
TOKENIZER_SAMPLES = 3
"""Prompts the server's own tokenizer is checked on: a different tokenizer shows on the first."""
TOKEN_ID_PREFIX = "token_id:"


class _NoAnswer(Exception):
    """A server that does not say how it tokenizes in the way asked (no such route, a refusal, no token ids)."""


def _token_ids(tokens: object, method: str) -> list[int]:
    if not isinstance(tokens, list) or not all(isinstance(token, int) for token in tokens):
        raise _NoAnswer(f"{method} returned no token ids")
    return list(tokens)


def parse_endpoint(text: str) -> tuple[str, str | None]:
    """`URL[#MODEL]` (its options already split off by `backends.variants`) -> (base URL, served model name or None)."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise QuantcheckError(f"{SYNTAX}: {text!r} is not an http(s) URL (e.g. url:http://127.0.0.1:8000/v1)")
    if parts.username or parts.password:
        raise QuantcheckError(
            f"the URL for {parts.hostname} carries credentials (not repeated here): "
            f"put the API key in {API_KEY_VARIABLES[0]} instead"
        )
    return parts._replace(query="", fragment="").geturl().rstrip("/"), parts.fragment or None


def _top_logprobs(options: dict[str, str], text: str) -> int | None:
    value = options.get("top_logprobs")
    if value is not None and (not value.isdigit() or int(value) < 1):
        raise QuantcheckError(f"top_logprobs must be a whole number >= 1, got {value!r} in {text!r}")
    return None if value is None else int(value)


def _prompt_logprobs(options: dict[str, str], text: str) -> int | None:
    value = options.get("prompt_logprobs", str(TEXT_TOP_LOGPROBS))
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise QuantcheckError(f"prompt_logprobs must be a whole number >= 1 or all, got {value!r} in {text!r}")
    return int(value)


def _prompt_rows_request(model: str, prompts: Sequence[Sequence[int]], logprobs: int) -> dict[str, object]:
    """Every position's log-probabilities of each prompt (vLLM's `prompt_logprobs`), one request for the batch."""
    return {
        "model": model,
        "prompt": [list(prompt) for prompt in prompts],
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": logprobs,
    }


def _prompt_entries(choice: dict, url: str) -> list[dict[str, dict]]:
    """Per prompt position, its log-probabilities keyed by token id (the first position has none)."""
    positions = choice.get("prompt_logprobs")
    if not isinstance(positions, list) or len(positions) < 2:
        raise EndpointError(
            f"the server at {url} returns no prompt log-probabilities (vLLM's prompt_logprobs on /completions): "
            "a text or prompts run needs them at every token; compare it on questions (mmlu:...)"
        )
    return positions


def check_prompt_logprobs(endpoint: Endpoint) -> None:
    """Before any work in a text or prompts run: the server gives log-probabilities at every prompt position."""
    client = Client(endpoint.url, retries=PROBE_RETRIES, advice=PROBE_ADVICE)
    try:
        asked = endpoint.rows_top(True) or -1
        choice = client.completions(_prompt_rows_request(endpoint.model, [PROBE_PROMPT], asked))[0]
    except EndpointError as error:
        if error.status not in (400, 422):
            raise
        raise EndpointError(
            f"the server at {endpoint.url} refuses prompt log-probabilities ({str(error).split(': ', 1)[-1]}): a "
            "text or prompts run needs them at every token; vLLM: --max-logprobs -1, or compare it on questions"
        ) from None
    finally:
        client.close()
    _prompt_entries(choice, endpoint.url)


def _weight_bytes(options: dict[str, str], text: str) -> int | None:
    """The served model's weight memory as the user states it (a server's memory is not visible to a client)."""
    value = options.get("weight_gb")
    try:
        gigabytes = None if value is None else float(value)
    except ValueError:
        gigabytes = -1.0
    if gigabytes is not None and not (gigabytes > 0 and math.isfinite(gigabytes)):
        raise QuantcheckError(
            f"weight_gb must be a positive number of GiB (the served model's weight memory), got {value!r} in {text!r}"
        )
    return None if gigabytes is None else round(gigabytes * 2**30)


def _row_request(model: str, prompts: Sequence[Sequence[int]], logprobs: int) -> dict[str, object]:
    """One request for a whole batch: the server schedules the batch as sent, so a resumed run that
    resends a batch gets the same numbers (concurrent single requests would batch as they arrive)."""
    return {
        "model": model,
        "prompt": [list(prompt) for prompt in prompts],
        "max_tokens": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "logprobs": logprobs,
        "return_tokens_as_token_ids": True,
    }


def _entries(choice: dict, url: str) -> dict[str, float]:
    """The next-token log-probabilities of a one-token completion, keyed `token_id:N`."""
    logprobs = choice.get("logprobs") or {}
    top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not top or not top[0]:
        raise EndpointError(
            f"the server at {url} returns no log-probabilities: "
            "quantcheck needs them for KL, Jaccard and the log-likelihood answer"
        )
    entries = top[0]
    if not all(key.startswith(TOKEN_ID_PREFIX) for key in entries):
        raise EndpointError(
            f"the server at {url} keys log-probabilities by token text, not by id (vLLM's return_tokens_as_token_ids): "
            "distinct tokens with the same text would collide"
        )
    return entries


def _check_row(ids: np.ndarray, top: int | None, width: int, url: str) -> None:
    """Every row as the probe promised: the full vocabulary, or at least the top K asked for. A shorter row
    would leave Jaccard@k for k beyond it to ties among missing entries, and KL to a bound on other terms."""
    wanted = width if top is None else min(top, width)
    if len(ids) < wanted or top is None and len(ids) != width:
        asked = "the full vocabulary" if top is None else f"its top {top}"
        raise EndpointError(
            f"the server at {url} returned {len(ids)} log-probabilities for a row where it was asked for {asked} "
            f"({wanted}, as it returned when probed): Jaccard@k and KL cannot rest on missing entries; "
            f"ask it for at most {len(ids)} (url:...?top_logprobs={max(len(ids), 1)}) or fix the server"
        )
    if ids.max() >= width:
        raise EndpointError(
            f"the server at {url} returned {len(ids)} log-probabilities up to id {ids.max()} "
            f"for a vocabulary of {width}"
        )


def vocab_size(folder: str) -> int | None:
    """The model's vocabulary size from its config.json (the width of a full row), when the folder has one."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text())
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _served_model(client: Client, model: str | None) -> str:
    served = [
        str(entry.get("id")) for entry in client.request("GET", "models").get("data", []) if isinstance(entry, dict)
    ]
    if model is None:
        if len(served) == 1:
            return served[0]
        raise EndpointError(
            f"{client.url} serves {len(served)} models ({', '.join(served) or 'none'}): "
            f"name one as url:{client.url}#MODEL"
        )
    if model not in served:
        raise EndpointError(f"{client.url} does not serve {model!r}; it serves: {', '.join(served) or 'nothing'}")
    return model


def _row_width(client: Client, model: str, top: int | None, folder: str) -> tuple[int | None, int]:
    """Probe log-probabilities: (top K or None for full rows, row width). Refusals are one line."""
    expected = vocab_size(folder)
    attempts = [top] if top is not None else [-1, *FALLBACK_TOP_LOGPROBS]
    refusals = []
    for asked in attempts:
        try:
            entries = _entries(client.completions(_row_request(model, [PROBE_PROMPT], asked))[0], client.url)
        except EndpointError as error:
            if error.status not in (400, 422):  # a refused request; anything else is not about log-probabilities
                raise
            refusals.append(f"logprobs={asked}: {str(error).split(': ', 1)[-1]}")
            continue
        width = expected or len(entries)
        if asked == -1:
            if expected is not None and len(entries) != expected:
                raise EndpointError(
                    f"the server at {client.url} returned {len(entries)} log-probabilities for logprobs=-1, "
                    f"but {folder} has a vocabulary of {expected}: is it serving the same model?"
                )
            return None, width
        if len(entries) < min(asked, width):
            raise EndpointError(
                f"the server at {client.url} returned {len(entries)} log-probabilities for logprobs={asked}"
            )
        return asked, width
    raise EndpointError(
        f"the server at {client.url} returns no log-probabilities ({'; '.join(refusals)}); "
        "vLLM: start it with --max-logprobs -1 for full rows"
    )


def connect(text: str, options: dict[str, str], folder: str) -> Endpoint:
    """Everything about a server that can be refused before any work: `text` well formed, the server
    reachable, serving the model, returning log-probabilities keyed by token id (full rows, else the top K)."""
    url, model = parse_endpoint(text)
    top_logprobs, weight_bytes = _top_logprobs(options, text), _weight_bytes(options, text)
    prompt_logprobs = _prompt_logprobs(options, text)
    client = Client(url, retries=PROBE_RETRIES, advice=PROBE_ADVICE)
    try:
        served = _served_model(client, model)
        top, _ = _row_width(client, served, top_logprobs, folder)
    finally:
        client.close()
    return Endpoint(
        url=url, model=served, top_logprobs=top, stated_weight_bytes=weight_bytes, prompt_logprobs=prompt_logprobs
    )


def endpoint_spec(text: str, options: dict[str, str], role: str, tokenizer_folder: str) -> ModelSpec:
    """A served model: `text` is URL[#MODEL], `options` its top_logprobs and weight_gb; the server is probed here,
    before any work."""
    from quantcheck.schema.models import ModelSpec

    endpoint = connect(text, options, tokenizer_folder)
    url, model = parse_endpoint(text)
    # The name (and so the model's folder) leaves out weight_gb: stating it later keeps the finished work.
    name = (
        "reference"
        if role == "reference"
        else (
            f"{PREFIX}:{url}"
            + (f"#{model}" if model else "")
            + (f"?top_logprobs={endpoint.top_logprobs}" if "top_logprobs" in options else "")
            + (f"?prompt_logprobs={options['prompt_logprobs']}" if "prompt_logprobs" in options else "")
        )
    )
    return ModelSpec(
        name=name,
        role=role,
        backend=OpenAIBackend.name,
        method="none" if role == "reference" else "served",
        weights=tokenizer_folder,
        endpoint=endpoint,
    )


class OpenAIBackend(Backend):
    """a model behind an OpenAI-compatible server (vLLM, SGLang, TGI, llama-server); API key from QUANTCHECK_API_KEY"""

    name = "openai"
    engine_package = "httpx"
    install_hint = "pip install httpx"
    quant_syntax = SYNTAX
    variant_options = OPTIONS
    scores_text = True

    @classmethod
    def methods(cls) -> dict[str, MethodInfo]:
        return {}  # the server decides how its model is built; quantcheck only compares it

    @classmethod
    def parse_variant(
        cls, rest: str, options: dict[str, str], reference_weights: str, calibration: Calibration
    ) -> ModelSpec | None:
        """`url:URL[#MODEL][?top_logprobs=K]`: the reference's folder gives the tokenizer, the chat template and the
        stop tokens."""
        return endpoint_spec(rest, options, "variant", reference_weights)

    @classmethod
    def plan_weights(cls, spec: ModelSpec, shape: ModelShape, dtype_bytes: int) -> WeightPlan:
        """A server's memory is its own: only what the user stated (weight_gb) stands for it."""
        stated = spec.endpoint.stated_weight_bytes if spec.endpoint else None
        if stated is None:
            return WeightPlan(bytes=None, basis="a server's weights: not visible from a client (state weight_gb)")
        return WeightPlan(bytes=stated, basis="as stated (weight_gb), not planned")

    @classmethod
    def check(cls, spec: ModelSpec, device: str, settings: BaseModel | None) -> None:
        """Nothing left: `connect` probed the server when the spec was made."""

    @classmethod
    def check_text(cls, spec: ModelSpec) -> None:
        check_prompt_logprobs(spec.endpoint)

    def __init__(self, job) -> None:
        super().__init__(job)
        from quantcheck.models.loading import load_tokenizer

        if self.spec.endpoint is None:
            raise QuantcheckError(f"{self.spec.name}: the openai backend needs a server ({SYNTAX})")
        self.endpoint: Endpoint = self.spec.endpoint
        self.tokenizer = load_tokenizer(self.spec.weights, job.trust_remote_code)
        self.client = Client(self.endpoint.url)
        self.width = 0
        self.server = "unknown"
        self.tokenizer_check: str | None = None
        """How the server's tokenizer was checked: '/tokenize', 'echo', 'different (...)', 'unverified'; None: not
        asked."""

    def load(self) -> None:
        """Check the server again (it may have changed since the parent probed it) and learn the row width."""
        _served_model(self.client, self.endpoint.model)
        top, self.width = _row_width(self.client, self.endpoint.model, self.endpoint.top_logprobs, self.spec.weights)
        if top != self.endpoint.top_logprobs:
            raise EndpointError(
                f"the server at {self.endpoint.url} now returns {'full rows' if top is None else f'the top {top}'} "
                "log-probabilities, not what the run started with: run the same command again"
            )
        self.server = _server_version(self.client)

    def tokenizer_mismatch(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> str | None:
        """The server's own tokenizer against the local one, on a few prompts: a server that serves another
        tokenizer would make every token metric meaningless. Asked of POST /tokenize at the server's root (vLLM,
        SGLang); where that route does not answer, of a completion that echoes the prompt sent as text
        (`echo`, its tokens returned by id). Where neither answers, the tokenizer is unverified
        (`tokenizer_verified` False, `tokenizer_note` says why) and the run says so."""
        samples = [(text, list(ids)) for text, ids in list(zip(texts, token_ids))[:TOKENIZER_SAMPLES]]
        reasons = []
        for method, server_tokens in (("/tokenize", self._tokenize_route), ("echo", self._echoed_tokens)):
            try:
                for text, ids in samples:
                    tokens = server_tokens(text)
                    if tokens != ids:
                        self.tokenizer_verified, self.tokenizer_check = False, f"different ({method})"
                        first = next(
                            (i for i, (a, b) in enumerate(zip(tokens, ids)) if a != b), min(len(tokens), len(ids))
                        )
                        return (
                            f"the server at {self.endpoint.url} tokenizes a prompt into {len(tokens)} tokens where "
                            f"{self.spec.weights} gives {len(ids)} (first difference at position {first}; by {method})"
                        )
            except _NoAnswer as reason:
                reasons.append(str(reason))
                continue
            self.tokenizer_verified, self.tokenizer_check = True, method
            return None
        self.tokenizer_verified, self.tokenizer_check = False, "unverified"
        self.tokenizer_note = (
            f"the server at {self.endpoint.url} could not be asked how it tokenizes ({'; '.join(reasons)}): "
            f"whether it reads the token ids as {self.spec.weights}'s tokenizer does is unverified"
        )
        return None

    def _tokenize_route(self, text: str) -> list[int]:
        """The server's tokens for `text` from POST /tokenize at its root (vLLM, SGLang)."""
        import httpx

        root = self.client.root
        try:
            response = self.client.http.post(root + "/tokenize", json={"model": self.endpoint.model, "prompt": text})
        except httpx.HTTPError as error:
            raise EndpointError(f"{root}/tokenize: {transport_reason(error)}; {RUN_ADVICE}") from None
        if response.status_code != 200:
            raise _NoAnswer(
                f"/tokenize answered HTTP {response.status_code}"
            )  # no such route: OpenAI, TGI, llama-server
        try:
            tokens = response.json().get("tokens")
        except (ValueError, AttributeError):
            tokens = None
        return _token_ids(tokens, "/tokenize")

    def _echoed_tokens(self, text: str) -> list[int]:
        """The server's tokens for `text` from a one-token completion that echoes its prompt: vLLM's
        `prompt_token_ids` (return_token_ids), else the echoed prompt's `logprobs.tokens` keyed by id."""
        payload = {
            "model": self.endpoint.model,
            "prompt": text,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
        }
        try:
            answer = self.client.request("POST", "completions", payload)
        except EndpointError as error:
            if error.status is None:
                raise  # the server is gone, not a refusal
            raise _NoAnswer(f"echo answered HTTP {error.status}") from None
        choices = answer.get("choices") if isinstance(answer, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        if isinstance(choice.get("prompt_token_ids"), list):
            return _token_ids(choice["prompt_token_ids"], "echo")
        logprobs = choice.get("logprobs")
        tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
        usage = answer.get("usage") if isinstance(answer, dict) else None
        count = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if (
            not isinstance(tokens, list)
            or not isinstance(count, int)
            or not all(isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX) for token in tokens[:count])
        ):
            raise _NoAnswer("echo returned no prompt token ids")
        return [int(token[len(TOKEN_ID_PREFIX) :]) for token in tokens[:count]]

    def describe(self) -> EngineInfo:
        from quantcheck.schema.results import EngineInfo

        rows = "full vocabulary" if self.top_logprobs is None else f"top {self.top_logprobs}"
        parallel = {"url": self.endpoint.url, "served_model": self.endpoint.model, "logprobs": rows}
        if self.tokenizer_check is not None:
            parallel["tokenizer_check"] = self.tokenizer_check
        return EngineInfo(
            engine="openai-http",
            version=self.server,
            compute_dtype="unknown",
            devices=["server"],
            parallel=parallel,
            tokenizer_verified=self.tokenizer_verified,
        )

    @property
    def vocab_width(self) -> int:
        return self.width

    @property
    def top_logprobs(self) -> int | None:
        return self.endpoint.rows_top(self.job.corpus is not None)

    def window_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> np.ndarray:
        """The server's prompt log-probabilities at positions first .. len-2 of each window, one request for the
        batch; -inf outside the top K (with the actual next token's, which the server adds)."""
        asked = -1 if self.top_logprobs is None else self.top_logprobs
        request = _prompt_rows_request(self.endpoint.model, windows, asked)
        choices = self.client.completions(request, len(windows))
        rows = np.full((len(windows), len(windows[0]) - first - 1, self.width), -np.inf, dtype=np.float32)
        for window_rows, choice in zip(rows, choices):
            for row, entries in zip(window_rows, _prompt_entries(choice, self.endpoint.url)[first + 1 :]):
                ids = np.fromiter((int(key.removeprefix(TOKEN_ID_PREFIX)) for key in entries), np.int64, len(entries))
                _check_row(ids, self.top_logprobs, self.width, self.endpoint.url)
                row[ids] = np.fromiter((entry["logprob"] for entry in entries.values()), np.float32, len(entries))
        return rows

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """One request for the batch; -inf outside the top K when the server returns only those."""
        asked = -1 if self.top_logprobs is None else self.top_logprobs
        choices = self.client.completions(_row_request(self.endpoint.model, prompts, asked), len(prompts))
        rows = np.full((len(prompts), self.width), -np.inf, dtype=np.float32)
        for row, choice in zip(rows, choices):
            entries = _entries(choice, self.endpoint.url)
            ids = np.fromiter((int(key[len(TOKEN_ID_PREFIX) :]) for key in entries), dtype=np.int64, count=len(entries))
            _check_row(ids, self.top_logprobs, self.width, self.endpoint.url)
            row[ids] = np.fromiter(entries.values(), dtype=np.float32, count=len(entries))
        return rows

    def generate(
        self, prompts: Sequence[Sequence[int]], settings: GenerationSettings, seeds: Sequence[int]
    ) -> list[list[int]]:
        """One request per prompt (a request has one seed; items are seeded apart), at most MAX_CONCURRENCY
        in flight; every sampling knob explicit, new ids returned as ids."""
        stops = set(settings.stop_token_ids)

        def one(index: int) -> list[int]:
            payload = {
                "model": self.endpoint.model,
                "prompt": list(prompts[index]),
                "max_tokens": settings.max_new_tokens,
                "temperature": 0.0 if settings.greedy else settings.temperature,
                "top_p": 1.0,
                "seed": seeds[index],
                "top_k": -1,
                "min_p": 0.0,
                "repetition_penalty": 1.0,
                "presence_penalty": 0.0,
                "frequency_penalty": 0.0,
                "stop_token_ids": sorted(stops),
                "return_token_ids": True,
                "n": 1,
            }
            choice = self.client.completions(payload)[0]
            if not isinstance(choice.get("token_ids"), list):
                raise EndpointError(
                    f"the server at {self.endpoint.url} returns generated text without token ids "
                    "(vLLM's return_token_ids); run with --skip-generation"
                )
            return [token for token in choice["token_ids"] if token not in stops]

        with ThreadPoolExecutor(max_workers=min(MAX_CONCURRENCY, len(prompts))) as pool:
            return list(pool.map(one, range(len(prompts))))

    def measure_cost(self, texts: Sequence[str], settings: object, on_step: Callable[[str], None]) -> ModelCost:
        from quantcheck.backends.openai.serving import measure_serving_cost

        self.load()
        on_step("load")
        return measure_serving_cost(self.endpoint, self.tokenizer, texts, settings, self.job.threads, on_step)


def _server_version(client: Client) -> str:
    """vLLM and SGLang answer GET /version (at the server root); others may not: then 'unknown'."""
    import httpx

    root = client.root
    try:
        response = client.http.get(root + "/version", timeout=CONNECT_TIMEOUT_S)
        version = response.json().get("version") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        version = None
    return str(version) if version else "unknown"


BACKEND = OpenAIBackend
