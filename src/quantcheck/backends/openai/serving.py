"""The cost of a model behind a server, as its clients feel it: streaming requests at several concurrency levels.

A server's process, memory and threads are not visible from a client, so nothing here pretends to
measure them: weight memory is 'not measured'. What a client can measure is measured per request:
time to first token (TTFT), the gaps between streamed tokens (inter-token latency, ITL), end-to-end
latency, and the output tokens per second of all requests together.

Each level keeps exactly `concurrency` requests in flight (a closed loop) until it has sent
`REQUESTS_PER_SLOT` x concurrency requests or its time budget is spent (then in-flight requests
finish). Every request is the same shape: `seq_len` prompt token ids, exactly `generation_new_tokens`
new tokens (min_tokens = max_tokens, eos ignored), greedy. A failed request is counted, not retried:
a retry would hide the failure inside a latency figure.
"""

from __future__ import annotations

import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import numpy as np

from quantcheck.backends.openai.client import MAX_CONCURRENCY, Client, EndpointError, server_message, transport_reason

if TYPE_CHECKING:
    from quantcheck.schema.models import Endpoint
    from quantcheck.schema.results import ModelCost, ServingPoint, TimingDistribution

REQUESTS_PER_SLOT = 2
NOT_MEASURED = "not measured: a served model's memory is the server's, not visible to a client"
LATENCY_METHOD = (
    "client-side streaming /v1/completions at each concurrency level (network, queueing and scheduler included)"
)


@dataclass(frozen=True)
class RequestTiming:
    """One streamed request: seconds from sending to the first token, between tokens, and to the end."""

    first_token_s: float
    gaps_s: list[float]
    end_to_end_s: float
    tokens: int


def stream_request(client: Client, payload: dict[str, object]) -> RequestTiming:
    """Send one streaming completion and time every chunk that carries tokens; any failure is one EndpointError."""
    start = time.perf_counter()
    arrivals: list[tuple[float, int]] = []
    try:
        with client.http.stream("POST", "completions", json={**payload, "stream": True}) as response:
            if response.status_code >= 400:
                response.read()
                raise EndpointError(f"HTTP {response.status_code}: {server_message(response)}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                choice = (json.loads(data).get("choices") or [{}])[0]
                tokens = len(choice.get("token_ids") or []) or int(bool(choice.get("text")))
                if tokens:
                    arrivals.append((time.perf_counter(), tokens))
    except httpx.HTTPError as error:
        raise EndpointError(transport_reason(error)) from None
    end = time.perf_counter()
    if not arrivals:
        raise EndpointError("the stream carried no tokens")
    gaps = []
    for (previous, _), (now, tokens) in itertools.pairwise(arrivals):
        gaps += [(now - previous) / tokens] * tokens  # a chunk of n tokens: n equal gaps
    return RequestTiming(arrivals[0][0] - start, gaps, end - start, sum(tokens for _, tokens in arrivals))


def distribution(values: Sequence[float]) -> TimingDistribution | None:
    from quantcheck.schema.results import TimingDistribution

    if not values:
        return None
    p10, p90 = np.percentile(values, [10, 90])
    return TimingDistribution(
        n=len(values),
        mean_s=statistics.fmean(values),
        median_s=statistics.median(values),
        p10_s=float(p10),
        p90_s=float(p90),
    )


def sweep_level(
    send: Callable[[int], RequestTiming], concurrency: int, time_budget_s: float, prompt_tokens: int, new_tokens: int
) -> ServingPoint:
    """Keep `concurrency` requests in flight until REQUESTS_PER_SLOT x concurrency were sent or time is up."""
    from quantcheck.schema.results import ServingPoint

    total = REQUESTS_PER_SLOT * concurrency
    counter, lock = itertools.count(), threading.Lock()
    timings: list[RequestTiming] = []
    failures: list[str] = []
    begin = time.perf_counter()
    deadline = time.monotonic() + time_budget_s

    def slot() -> None:
        while True:
            with lock:
                index = next(counter)
            if index >= total or (index >= concurrency and time.monotonic() > deadline):
                return
            try:
                timing = send(index)
            except EndpointError as error:
                failures.append(str(error))
            else:
                timings.append(timing)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(slot) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - begin
    tokens = sum(timing.tokens for timing in timings)
    return ServingPoint(
        concurrency=concurrency,
        requests=len(timings) + len(failures),
        failed=len(failures),
        error=failures[0] if failures else None,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        wall_s=wall,
        time_to_first_token=distribution([timing.first_token_s for timing in timings]),
        inter_token_latency=distribution([gap for timing in timings for gap in timing.gaps_s]),
        end_to_end=distribution([timing.end_to_end_s for timing in timings]),
        output_tokens_per_s=tokens / wall if timings else None,
        requests_per_s=len(timings) / wall if timings else None,
    )


def concurrency_levels(batch_sizes: Sequence[int]) -> list[int]:
    """The cost sweep's batch sizes up to the backend's MAX_CONCURRENCY (1 when none is that small): bounded
    load on a server that may be shared."""
    return [size for size in batch_sizes if size <= MAX_CONCURRENCY] or [1]


def measure_serving_cost(
    endpoint: Endpoint, tokenizer, texts: Sequence[str], settings, threads: int, on_step: Callable[[str], None]
) -> ModelCost:
    """Warm-up requests, then one `ServingPoint` per concurrency level; refused when every request failed."""
    from quantcheck.cost.scenario import CostSettings
    from quantcheck.data.batching import fixed_length_prompts
    from quantcheck.schema.results import ModelCost

    settings = CostSettings(**settings) if isinstance(settings, dict) else settings
    levels = concurrency_levels(settings.batch_sizes)
    prompts = fixed_length_prompts(tokenizer, texts, settings.seq_len, REQUESTS_PER_SLOT * max(levels))
    new_tokens = settings.generation_new_tokens
    client = Client(endpoint.url)

    def send(index: int) -> RequestTiming:
        payload = {
            "model": endpoint.model,
            "prompt": prompts[index % len(prompts)],
            "max_tokens": new_tokens,
            "min_tokens": new_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "top_p": 1.0,
            "return_token_ids": True,
        }
        return stream_request(client, payload)

    try:
        for index in range(settings.warmup):
            send(index)
        points = []
        for level in levels:
            points.append(sweep_level(send, level, settings.time_budget_s, settings.seq_len, new_tokens))
            on_step(f"concurrency {level}")
    finally:
        client.close()
    if all(point.failed == point.requests for point in points):
        raise EndpointError(f"{endpoint.url}: every streamed request failed ({points[0].error})")
    return ModelCost(
        memory_method=NOT_MEASURED,
        threads=threads,
        engine="openai-http",
        latency_method=LATENCY_METHOD,
        load_time_s=None,
        weights=None,
        stated_weight_bytes=endpoint.stated_weight_bytes,
        serving=points,
    )
