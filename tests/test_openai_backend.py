"""Models behind a real OpenAI-compatible server: vLLM's own server, started here on 127.0.0.1.

The server runs from the vLLM environment (QUANTCHECK_VLLM_PYTHON, made by `make test`), serving
the built-in model in float32 with every log-probability (`--max-logprobs -1`). It starts once for
the module and is stopped by its process id; without the environment these tests are skipped
with the reason, never faked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import (
    SMALL_COST,
    VLLM_PYTHON,
    lowercase_tokenizer_copy,
    needs_vllm,
    quantcheck,
    read_items,
    read_results,
    write_questions,
)
from quantcheck.models.loading import resolve_model
from quantcheck.schema.models import ModelSpec
from test_cli_errors import assert_one_line_error
from test_resume import start, wait_for_lines

pytestmark = needs_vllm  # every test here talks to a real vLLM server

SERVED_NAME = "smollm2"
START_TIMEOUT_S = 300
N_QUESTIONS = 24


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, with bounded start-up; stopped by its pid."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.log, self.port = model, log, _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, max_logprobs: int = -1) -> None:
        command = [
            VLLM_PYTHON,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            SERVED_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            "1024",
            "--enforce-eager",
            "--max-logprobs",
            str(max_logprobs),
            "--kv-cache-memory-bytes",
            str(1 << 30),
            "--seed",
            "0",
        ]
        # The engine in the server's process (healthy after about 60 s here instead of 85), both cores for it.
        environment = {
            **os.environ,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_LOGGING_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
        }
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the vLLM server exited with {self.process.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(
            f"the vLLM server was not healthy within {START_TIMEOUT_S} s: {self.log.read_text()[-2000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server's process group (its engine runs in child processes) and wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


class FaultyProxy:
    """A pass-through proxy on 127.0.0.1 in front of the real vLLM server, which changes one thing about it:
    `no_tokenize` answers POST /tokenize with 404 (as OpenAI, TGI and llama-server do), `no_echo` also refuses
    completions that echo their prompt with 400 (as OpenAI's chat-era models do), `row_entries` keeps only the top N
    log-probabilities of each row in requests for several prompts (a server that returns fewer under load than when
    probed alone), `faults` answers the first requests for a batch of rows with these HTTP statuses (a transient
    fault that clears, after the probe), `max_logprobs` refuses any completion that asks for more log-probabilities
    than that (-1 included) with 400, as OpenAI does past its limits, and `text_keys` keys each row's entries by the
    token's text instead of `token_id:N`, and `no_prompt_logprobs` drops every completion's prompt log-probabilities
    (a server that ignores the field). It records every request's headers, path and body. Every other byte is the
    server's own answer."""

    def __init__(
        self,
        upstream: str,
        *,
        no_tokenize: bool = False,
        no_echo: bool = False,
        row_entries: int | None = None,
        faults: tuple[int, ...] = (),
        fail_after: int | None = None,
        max_logprobs: int | None = None,
        text_keys: bool = False,
        no_prompt_logprobs: bool = False,
    ) -> None:
        import httpx

        root = upstream.removesuffix("/v1")
        client = httpx.Client(timeout=300)
        settings = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = json.loads(body) if body else {}
                with settings.lock:
                    settings.seen.append((dict(self.headers), self.path, body))
                    batch = isinstance(request.get("prompt"), list) and len(request["prompt"]) > 1
                    injects = settings.faults and batch and self.path.endswith("/completions")
                    fault = settings.faults.pop(0) if injects else None
                    if batch and self.path.endswith("/completions") and settings.fail_after is not None:
                        fault = fault or (503 if settings.answered >= settings.fail_after else None)
                        settings.answered += fault is None
                if fault is not None:
                    return self._answer(fault, b'{"error": {"message": "injected fault"}}')
                asked = request.get("logprobs")
                if settings.max_logprobs is not None and isinstance(asked, int):
                    if asked == -1 or asked > settings.max_logprobs:
                        message = f"logprobs must be at most {settings.max_logprobs}"
                        return self._answer(400, json.dumps({"error": {"message": message}}).encode())
                if settings.no_tokenize and self.path == "/tokenize":
                    return self._answer(404, b'{"detail": "Not Found"}')
                if settings.no_echo and self.path.endswith("/completions") and request.get("echo"):
                    return self._answer(400, b'{"error": {"message": "echo is not supported with this model"}}')
                answer = client.request(
                    method, root + self.path, content=body, headers={"Content-Type": "application/json"}
                )
                content = answer.content
                prompts = request.get("prompt")
                if (
                    settings.row_entries
                    and self.path.endswith("/completions")
                    and answer.status_code == 200
                    and isinstance(prompts, list)
                    and len(prompts) > 1
                    and isinstance(prompts[0], list)
                ):
                    data = answer.json()
                    for choice in data["choices"]:
                        row = choice["logprobs"]["top_logprobs"][0]
                        choice["logprobs"]["top_logprobs"][0] = dict(
                            sorted(row.items(), key=lambda entry: -entry[1])[: settings.row_entries]
                        )
                    content = json.dumps(data).encode()
                if settings.text_keys and self.path.endswith("/completions") and answer.status_code == 200:
                    data = json.loads(content)
                    for choice in data.get("choices", []):
                        rows = (choice.get("logprobs") or {}).get("top_logprobs") or []
                        choice["logprobs"]["top_logprobs"] = [
                            {key.replace("token_id:", "text "): value for key, value in row.items()} if row else row
                            for row in rows
                        ]
                    content = json.dumps(data).encode()
                if settings.no_prompt_logprobs and self.path.endswith("/completions") and answer.status_code == 200:
                    data = json.loads(content)
                    for choice in data.get("choices", []):
                        choice.pop("prompt_logprobs", None)  # as llama-server and OpenAI answer: the field ignored
                    content = json.dumps(data).encode()
                self._answer(answer.status_code, content)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

        self.no_tokenize, self.no_echo, self.row_entries = no_tokenize or no_echo, no_echo, row_entries
        self.faults, self.max_logprobs, self.text_keys = list(faults), max_logprobs, text_keys
        self.fail_after, self.answered, self.no_prompt_logprobs = fail_after, 0, no_prompt_logprobs
        self.seen: list[tuple[dict[str, str], str, bytes]] = []
        self.lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()
        self.client = client

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.client.close()


@pytest.fixture
def proxies(server):
    started: list[FaultyProxy] = []

    def make(**faults) -> FaultyProxy:
        started.append(FaultyProxy(server.url, **faults))
        return started[-1]

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = VLLMServer(resolve_model(None).path, tmp_path_factory.mktemp("server") / "vllm-server.log")
    served.start()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    return write_questions(tmp_path_factory.mktemp("questions") / "q.jsonl", N_QUESTIONS)


def model_folder(name: str) -> str:
    """The folder under models/ that the run gives a model of this name (`ModelSpec.folder`)."""
    return ModelSpec(name=name, role="variant", backend="openai", method="served", weights="").folder


def by_item(out: Path, name: str) -> dict[str, dict]:
    return {item["item_id"]: item for item in read_items(out) if item["model"] == name}


QUALITY_ONLY = ["--skip-cost", "--skip-generation", "--no-floors"]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, server, questions) -> Path:
    """In-process transformers fp32 reference against the same weights served by vLLM, full rows; every phase."""
    out = tmp_path_factory.mktemp("served") / "run"
    result = quantcheck(
        "run",
        "--dataset",
        str(questions),
        "--quant",
        f"url:{server.url}",
        "--out",
        str(out),
        "--no-floors",
        "--max-new-tokens",
        "8",
        "--cost-rounds",
        "1",
        *SMALL_COST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_served_fp32_equals_in_process_transformers_fp32(fp32_run, server):
    results = read_results(fp32_run)
    served = next(model for model in results["models"] if model["name"] == f"url:{server.url}")
    assert served["backend"] == "openai" and served["engine"]["engine"] == "openai-http"
    assert served["engine"]["parallel"]["logprobs"] == "full vocabulary"
    assert served["paired_loglik"]["n"] == N_QUESTIONS
    assert served["paired_loglik"]["answer_agreement"] == 1.0  # identical log-likelihood answers, item by item
    items = by_item(fp32_run, served["name"])
    assert len(items) == N_QUESTIONS
    assert 0 <= sum(item["kl"] for item in items.values()) / N_QUESTIONS <= 1e-5
    assert served["agreement"]["top1_agreement"]["value"] == 1.0
    assert not served["agreement"]["kl"]["is_lower_bound"]
    # Generation over HTTP: the same token ids, the same seeded settings, answers parsed as in-process.
    assert served["generative"]["accuracy"]["n"] == N_QUESTIONS
    generated = [
        item["generative"]
        for item in read_items(fp32_run)
        if item["model"] == served["name"] and item.get("generative")
    ]
    assert len(generated) == N_QUESTIONS and all(answer["new_tokens"] <= 8 for answer in generated)
    # Cost from the client's side: streaming latency per concurrency level; memory is the server's, not measured.
    cost = served["cost"]
    assert cost["weights"] is None and cost["load_time_s"] is None and "not measured" in cost["memory_method"]
    assert [point["concurrency"] for point in cost["serving"]] == [1, 2]
    for point in cost["serving"]:
        assert point["failed"] == 0 and point["requests"] >= point["concurrency"]
        assert 0 < point["time_to_first_token"]["median_s"] <= point["end_to_end"]["median_s"]
        assert point["output_tokens_per_s"] > 0
    assert "memory" in served["verdict"]["checks"] and served["verdict"]["checks"]["memory"] != "pass"


def test_top_20_bound_is_below_the_exact_kl_on_every_item_and_jaccard_is_exact(tmp_path, server, questions):
    """A bfloat16 reference makes the served fp32 model differ; its full rows give the exact KL, the same
    server asked for its top 20 gives the bound, compared item by item (the full store keeps KL exact)."""
    out = tmp_path / "run"
    full, top20 = f"url:{server.url}", f"url:{server.url}?top_logprobs=20"
    result = quantcheck(
        "run",
        "--dataset",
        str(questions),
        "--dtype",
        "bfloat16",
        "--store",
        "full",
        "--quant",
        full,
        "--quant",
        top20,
        "--out",
        str(out),
        *QUALITY_ONLY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exact, bounded = by_item(out, full), by_item(out, top20)
    assert set(exact) == set(bounded) and len(exact) == N_QUESTIONS
    assert (
        sum(item["kl"] for item in exact.values()) / N_QUESTIONS > 1e-4
    )  # bf16 against fp32: a real difference to bound
    for item_id, item in exact.items():
        assert item["kl_bound"] is None
        assert bounded[item_id]["kl_bound"].startswith("lower bound from the variant's top 20")
        assert 0 <= bounded[item_id]["kl"] <= item["kl"], item_id
        assert bounded[item_id]["jaccard"] == item["jaccard"], item_id  # every k <= 20 is exact
        assert bounded[item_id]["top1_agree"] == item["top1_agree"]
    share = sum(bounded[i]["kl"] for i in exact) / sum(item["kl"] for item in exact.values())
    assert share > 0.5, share  # the bound is informative, not just 0
    results = read_results(out)
    kl = next(model for model in results["models"] if model["name"] == top20)["agreement"]["kl"]
    assert kl["is_lower_bound"] and kl["method"].startswith("lower bound")
    verdict = next(model for model in results["models"] if model["name"] == top20)["verdict"]
    assert verdict["checks"]["mean KL"] != "pass"  # a lower bound never passes the KL limit
    assert "lower bound" in (out / "report.md").read_text()


def test_wrong_url_and_wrong_model_name_are_one_line_errors_before_any_work(tmp_path, server):
    out = tmp_path / "run"
    refused = quantcheck(
        "run", "--limit", "2", "--quant", f"url:http://127.0.0.1:{_free_port()}/v1", "--out", str(out), timeout=120
    )
    assert_one_line_error(refused, "connection refused")
    assert not out.exists()
    wrong_model = quantcheck(
        "run", "--limit", "2", "--quant", f"url:{server.url}#no-such-model", "--out", str(out), timeout=120
    )
    assert_one_line_error(wrong_model, f"does not serve 'no-such-model'; it serves: {SERVED_NAME}")
    assert not out.exists()
    not_api = quantcheck(
        "run", "--limit", "2", "--quant", f"url:{server.url.removesuffix('/v1')}", "--out", str(out), timeout=120
    )
    assert_one_line_error(not_api, "/v1")
    assert not out.exists()


def test_all_served_reference_and_variant(tmp_path, server):
    """The reference behind the server too: the reference's full rows fill the compact store; a reference
    known only on its top K cannot (one line before any work) unless the store is full."""
    out = tmp_path / "run"
    # weight_gb: what the user knows of each server's memory (a client cannot see it), named as stated.
    result = quantcheck(
        "run",
        "--limit",
        "8",
        "--reference-url",
        f"{server.url}?weight_gb=0.5",
        "--quant",
        f"url:{server.url}?top_logprobs=20&weight_gb=0.25",
        "--out",
        str(out),
        "--skip-generation",
        "--no-floors",
        *SMALL_COST,
        "--batch-sizes",
        "1",
        "--cost-rounds",
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference, variant = read_results(out)["models"]
    assert variant["name"] == f"url:{server.url}?top_logprobs=20"  # the stated memory is not part of the name
    assert variant["cost"]["stated_weight_bytes"] == 2**28 and variant["cost"]["weights"] is None
    assert variant["cost_vs_reference"]["memory_saving"] == 0.5 and variant["cost_vs_reference"]["weight_memory_stated"]
    memory = next(reason for reason in variant["verdict"]["reasons"] if "weight memory" in reason)
    assert (
        "saves 50% of weight memory (a served model's weight memory as stated with weight_gb, not measured)" in memory
    )
    assert reference["backend"] == variant["backend"] == "openai"
    assert (
        variant["paired_loglik"]["answer_agreement"] == 1.0 and variant["agreement"]["top1_agreement"]["value"] == 1.0
    )
    assert variant["agreement"]["kl"]["is_lower_bound"] and variant["agreement"]["kl"]["mean"]["value"] <= 1e-6
    refused = quantcheck(
        "run",
        "--limit",
        "8",
        "--reference-url",
        f"{server.url}?top_logprobs=20",
        "--quant",
        f"url:{server.url}",
        "--out",
        str(tmp_path / "top"),
        timeout=120,
    )
    assert_one_line_error(refused, "only its top 20 log-probabilities", "--store full")


def test_a_server_with_another_tokenizer_keeps_accuracy_but_refuses_token_metrics(tmp_path, server):
    """The reference's folder lower-cases every prompt; the server's own /tokenize does not: the ids sent
    are the reference's, so accuracy stands, but KL, Jaccard and top-1 would compare different texts."""
    lowercase = lowercase_tokenizer_copy(tmp_path / "lowercase-tokenizer")
    out = tmp_path / "run"
    result = quantcheck(
        "run", str(lowercase), "--limit", "4", "--quant", f"url:{server.url}", "--out", str(out), *QUALITY_ONLY
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = read_results(out)
    served = results["models"][1]
    assert served["paired_loglik"]["n"] == 4 and served["agreement"] is None
    assert any(w["code"] == "tokenizer-mismatch" and w["model"] == served["name"] for w in results["warnings"])
    assert f"the server at {server.url} tokenizes a prompt into" in " ".join(
        result.stderr.split()
    )  # the reason, as the run went


def test_rows_with_fewer_log_probabilities_than_asked_are_refused_in_one_line(tmp_path, server, proxies):
    """Defect 8 of issue 24: the probe gets the top 20, the batches only the top 10. Jaccard@k for k = 20
    would be computed from ties among missing entries and labelled exact: the row is refused instead."""
    short = proxies(row_entries=10)
    out = tmp_path / "run"
    result = quantcheck(
        "run",
        "--limit",
        "4",
        "--store",
        "full",
        "--quant",
        f"url:{short.url}?top_logprobs=20",
        "--out",
        str(out),
        *QUALITY_ONLY,
    )
    assert result.returncode == 0, result.stderr[-3000:]  # as for any variant that fails: the run ends with what it has
    failures = [
        line for line in result.stderr.splitlines() if f"url:{short.url}?top_logprobs=20 (quality) failed" in line
    ]
    assert len(failures) == 1, result.stderr[-3000:]
    assert "returned 10 log-probabilities for a row where it was asked for its top 20" in failures[0]
    assert "Traceback" not in result.stderr
    assert not by_item(out, f"url:{short.url}?top_logprobs=20")  # no item scored on short rows


def test_a_server_without_tokenize_is_checked_by_an_echoed_prompt(tmp_path, server, proxies):
    """Defect 8 of issue 24: without /tokenize the server's tokenizer was not checked at all. The prompt sent as
    text and echoed back by id shows the lower-casing tokenizer; a server that refuses both is unverified, and says
    so."""
    lowercase = lowercase_tokenizer_copy(tmp_path / "lowercase-tokenizer")
    no_tokenize = proxies(no_tokenize=True)
    out = tmp_path / "lower"
    result = quantcheck(
        "run", str(lowercase), "--limit", "4", "--quant", f"url:{no_tokenize.url}", "--out", str(out), *QUALITY_ONLY
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = read_results(out)["models"][1]
    assert served["paired_loglik"]["n"] == 4 and served["agreement"] is None  # token metrics refused, as with /tokenize
    assert (
        served["engine"]["tokenizer_verified"] is False
        and served["engine"]["parallel"]["tokenizer_check"] == "different (echo)"
    )
    assert f"the server at {no_tokenize.url} tokenizes a prompt into" in " ".join(result.stderr.split())

    no_echo = proxies(no_echo=True)
    out = tmp_path / "same"
    result = quantcheck(
        "run",
        "--limit",
        "4",
        "--quant",
        f"url:{server.url}",
        "--quant",
        f"url:{no_tokenize.url}",
        "--quant",
        f"url:{no_echo.url}",
        "--out",
        str(out),
        *QUALITY_ONLY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference, direct, echoed, unverified = read_results(out)["models"]
    assert reference["engine"]["tokenizer_verified"] is None  # in-process: quantcheck's own ids
    assert (
        direct["engine"]["tokenizer_verified"] is True
        and direct["engine"]["parallel"]["tokenizer_check"] == "/tokenize"
    )
    assert echoed["engine"]["tokenizer_verified"] is True and echoed["engine"]["parallel"]["tokenizer_check"] == "echo"
    assert echoed["agreement"]["top1_agreement"]["value"] == 1.0
    assert (
        unverified["engine"]["tokenizer_verified"] is False
        and unverified["engine"]["parallel"]["tokenizer_check"] == "unverified"
    )
    stderr = " ".join(result.stderr.split())
    assert (
        f"the server at {no_echo.url} could not be asked how it tokenizes "
        "(/tokenize answered HTTP 404; echo answered HTTP 400)" in stderr
    ), stderr[-3000:]


def test_server_killed_mid_variant_is_one_line_and_a_rerun_equals_the_uninterrupted_run(
    tmp_path, server, questions, fp32_run
):
    out = tmp_path / "run"
    args = ["run", "--dataset", str(questions), "--quant", f"url:{server.url}", "--out", str(out), *QUALITY_ONLY]
    process = start(args)
    folder = model_folder(f"url:{server.url}")
    wait_for_lines(process, out / "models" / folder / "quality.jsonl", 1)
    server.stop(signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    # As for any variant that fails: the run goes on and ends with what it has, the failure in one line.
    assert process.returncode == 0, stderr[-2000:]
    failures = [line for line in stderr.splitlines() if f"url:{server.url} (quality) failed" in line]
    assert len(failures) == 1 and "run the same command again once the server is back" in failures[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert read_results(out)["finished"] is False
    kept = by_item(out, f"url:{server.url}")
    assert 0 < len(kept) < N_QUESTIONS  # the finished batches are kept
    server.start()
    rerun = quantcheck(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed, uninterrupted = by_item(out, f"url:{server.url}"), by_item(fp32_run, f"url:{server.url}")
    assert set(resumed) == set(uninterrupted)
    for item_id, item in resumed.items():
        assert (
            item["loglik"] == uninterrupted[item_id]["loglik"]
            and item["topk_ids"] == uninterrupted[item_id]["topk_ids"]
        )
        assert item["kl"] == pytest.approx(uninterrupted[item_id]["kl"], abs=1e-9)


SECRET = "sk-quantcheck-test-8f3a91c2"


def test_the_api_key_goes_only_in_a_header_and_nowhere_in_the_run(tmp_path, server, proxies):
    proxy = proxies()
    out = tmp_path / "run"
    result = quantcheck(
        "run",
        "--limit",
        "4",
        "--quant",
        f"url:{proxy.url}",
        "--out",
        str(out),
        *QUALITY_ONLY,
        env={"QUANTCHECK_API_KEY": SECRET},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.seen and all(headers.get("Authorization") == f"Bearer {SECRET}" for headers, _, _ in proxy.seen)
    assert not [path for _, path, body in proxy.seen if SECRET in path or SECRET.encode() in body]
    assert SECRET not in result.stdout + result.stderr
    leaked = [path for path in out.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert not leaked, leaked


def test_transient_faults_that_clear_are_retried_and_change_nothing(tmp_path, server, proxies):
    """429, 503 and 408 once each, then the server answers: the run finishes with the same rows as through a proxy
    without faults."""
    clean, faulty = proxies(), proxies(faults=(429, 503, 408))
    runs = {}
    for name, proxy in (("clean", clean), ("faulty", faulty)):
        out = tmp_path / name
        result = quantcheck("run", "--limit", "4", "--quant", f"url:{proxy.url}", "--out", str(out), *QUALITY_ONLY)
        assert result.returncode == 0 and "failed" not in result.stderr, result.stderr[-3000:]
        runs[name] = by_item(out, f"url:{proxy.url}")
    assert not faulty.faults  # every fault was served, and retried past
    completions = [path for _, path, _ in faulty.seen if path.endswith("/completions")]
    assert len(completions) == len([path for _, path, _ in clean.seen if path.endswith("/completions")]) + 3
    assert set(runs["clean"]) == set(runs["faulty"]) and len(runs["clean"]) == 4
    for item_id, item in runs["faulty"].items():
        assert item["loglik"] == runs["clean"][item_id]["loglik"] and item["kl"] == runs["clean"][item_id]["kl"]


def test_a_fault_that_never_clears_fails_the_phase_in_one_line_and_the_same_command_resumes(
    tmp_path, server, questions, proxies
):
    """After one batch of rows the server answers 503 to everything: the variant's phase stops in one line once the
    retries are spent, the finished batch is kept, and the same command, once the server is back, scores only the
    rest, leaving the kept records as they were."""
    proxy = proxies(fail_after=1)
    out = tmp_path / "run"
    args = [
        "run",
        "--dataset",
        str(questions),
        "--limit",
        "6",
        "--batch-size",
        "2",
        "--quant",
        f"url:{proxy.url}",
        "--out",
        str(out),
        *QUALITY_ONLY,
    ]
    first = quantcheck(*args)
    assert first.returncode == 0, first.stderr[-3000:]  # the run goes on and ends with what it has
    failures = [line for line in first.stderr.splitlines() if f"url:{proxy.url} (quality) failed" in line]
    assert len(failures) == 1 and "HTTP 503" in failures[0] and "5 tries" in failures[0], first.stderr[-2000:]
    assert "run the same command again once the server is back" in failures[0] and "Traceback" not in first.stderr
    assert read_results(out)["finished"] is False
    kept = by_item(out, f"url:{proxy.url}")
    assert len(kept) == 2  # the one batch the server answered
    proxy.fail_after = None
    rerun = quantcheck(*args)
    assert rerun.returncode == 0 and "failed" not in rerun.stderr, rerun.stderr[-3000:]
    resumed = by_item(out, f"url:{proxy.url}")
    assert len(resumed) == 6 and read_results(out)["finished"] is True
    assert all(resumed[item_id] == record for item_id, record in kept.items())
    quality = out / "models" / model_folder(f"url:{proxy.url}")
    lines = (quality / "quality.jsonl").read_text().splitlines()
    assert len(lines) == 6  # nothing scored twice


def test_a_server_capped_at_5_log_probabilities_is_asked_for_20_then_5_and_judged_on_a_bound(tmp_path, server, proxies):
    capped = proxies(max_logprobs=5)
    out = tmp_path / "run"
    result = quantcheck("run", "--limit", "4", "--quant", f"url:{capped.url}", "--out", str(out), *QUALITY_ONLY)
    assert result.returncode == 0, result.stderr[-3000:]
    requests = [json.loads(body) for _, path, body in capped.seen if path.endswith("/completions")]
    asked = [request.get("logprobs") for request in requests]
    assert asked[:3] == [-1, 20, 5], asked  # the probe falls back from the full row to the top 20 to the top 5
    batches = [request["logprobs"] for request in requests if len(request["prompt"]) > 1]
    assert batches and set(batches) == {5}, asked  # every batch of rows asks for what the probe found
    variant = next(m for m in read_results(out)["models"] if m["role"] == "variant")
    assert variant["agreement"]["kl"]["is_lower_bound"] is True
    assert variant["verdict"]["checks"]["mean KL"] != "pass"
    assert set(variant["agreement"]["jaccard"]) == {"1", "2", "3", "5"}  # exact only where k <= 5


def test_entries_keyed_by_token_text_are_refused_in_one_line_before_any_work(tmp_path, server, proxies):
    texted = proxies(text_keys=True)
    out = tmp_path / "run"
    refused = quantcheck("run", "--limit", "2", "--quant", f"url:{texted.url}", "--out", str(out), timeout=120)
    assert_one_line_error(refused, "keys log-probabilities by token text")
    assert not out.exists()


def test_text_through_a_server_rests_on_its_top_20_at_every_token(tmp_path, server):
    """A served copy of the reference's fp32 weights, every token of a text window over HTTP: the NLL is exact (the
    server adds the actual token's log-probability), KL is a lower bound from the top 20, and both are the engine
    floor's size."""
    out = tmp_path / "run"
    result = quantcheck(
        "run", "--quant", f"url:{server.url}", "--dataset", "text:builtin", "--limit", "1", "--skip-cost",
        "--out", str(out), timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    variant = next(entry for entry in read_results(out)["models"] if entry["role"] == "variant")
    corpus = variant["corpus"]
    assert corpus["tokens"] == 255 and abs(corpus["perplexity_ratio"]["value"] - 1) <= 1e-4
    assert 0 <= corpus["kl"]["mean"]["value"] <= 1e-5 and corpus["same_top1"]["value"] >= 0.99
    records = [json.loads(line) for line in (out / "models" / model_folder(variant["name"]) / "corpus.jsonl").open()]
    assert records[0]["kl_bound"] and "20" in records[0]["kl_bound"]
    assert variant["engine_floor"] is None  # top-K rows have no engine floor of their own


def test_prompts_through_a_server_are_scored_and_answered_by_it(tmp_path, server):
    from test_prompts import CHATS, MAX_NEW_TOKENS, write_prompts

    out = tmp_path / "run"
    result = quantcheck(
        "run", "--quant", f"url:{server.url}", "--dataset", f"prompts:{write_prompts(tmp_path / 'p.jsonl', CHATS)}",
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--skip-cost", "--out", str(out), timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    variant = next(entry for entry in read_results(out)["models"] if entry["role"] == "variant")
    answers = json.loads((out / "reference" / "answers.json").read_text())["answers"]
    assert variant["corpus"]["tokens"] == sum(map(len, answers)) and variant["corpus"]["kl"]["mean"]["value"] <= 1e-5
    assert variant["free_answers"]["n"] == len(CHATS) and variant["free_answers"]["diverged"] <= 1


def test_a_server_without_prompt_log_probabilities_is_one_line_before_any_work(tmp_path, server, proxies):
    proxy = proxies(no_prompt_logprobs=True)
    out = tmp_path / "run"
    result = quantcheck("run", "--quant", f"url:{proxy.url}", "--dataset", "text:builtin", "--out", str(out))
    assert_one_line_error(result, "returns no prompt log-probabilities", "compare it on questions")
    assert not (out / "models").exists()


def test_a_server_without_log_probabilities_is_one_line_before_any_work(tmp_path, server):
    """Last in the module: the server restarts refusing every log-probability (vLLM --max-logprobs 0)."""
    server.stop()
    server.start(max_logprobs=0)
    out = tmp_path / "run"
    refused = quantcheck("run", "--limit", "2", "--quant", f"url:{server.url}", "--out", str(out), timeout=120)
    assert_one_line_error(refused, "returns no log-probabilities")
    assert "--max-logprobs -1" in refused.stderr
    assert not out.exists()
