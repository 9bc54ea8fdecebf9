"""The child process: loads one model and does one job, writing every finished batch to disk.

Started by the launcher as `python -m quantcheck.orchestration.worker JOB.json`. Progress goes to stdout as
prefixed JSON lines; library chatter goes to the model's log file. Exit 0 on success, 2 on a
problem the user can fix (message in `<kind>.error.json`), 130 on Ctrl-C, 1 on anything else.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from quantcheck.errors import QuantcheckError
from quantcheck.schema.jobs import EVENT_PREFIX, JobSpec
from quantcheck.schema.results import AnswerRecord, GenerationSettings
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import append_records, read_latest_by_id, write_json_atomic, write_text_atomic


def emit(event: str, **fields: object) -> None:
    print(EVENT_PREFIX + json.dumps({"event": event, **fields}), flush=True)


def run_quality(job: JobSpec, folder: RunFolder) -> None:
    from quantcheck.backends import get_backend
    from quantcheck.data.prompts import loglik_prompt
    from quantcheck.schema.results import ItemRecord
    from quantcheck.scoring.generative import (
        encode_generation_prompts,
        generate_answers,
        resolve_settings,
        stop_token_ids,
    )
    from quantcheck.scoring.loglik import encode_items, score_items

    spec = job.model
    backend = get_backend(spec.backend)(job)
    tokenizer = backend.tokenizer
    emit("phase", phase="load", model=spec.name)
    start = time.perf_counter()
    backend.load()
    write_json_atomic(
        folder.model_file(spec.folder, "engine.json"),
        _engine_info(backend, folder.model_file(spec.folder, "engine.json")),
    )
    emit("loaded", seconds=time.perf_counter() - start)
    if job.corpus is not None:
        run_corpus(job, folder, backend)
        return
    items = folder.read_items()
    encoded = encode_items(tokenizer, items) if job.loglik or job.engine_floor else None

    if job.loglik:
        reference = folder.reference_store()
        if spec.is_reference:
            folder.write_reference_tokens(encoded.prompt_ids)
            compare_tokens = True
            if mismatch := backend.tokenizer_mismatch([loglik_prompt(item) for item in items], encoded.prompt_ids):
                emit(
                    "warning",
                    code="tokenizer-mismatch",
                    message=f"{mismatch}: the served reference reads the ids as another tokenizer would",
                )
        else:
            compare_tokens = folder.read_reference_tokens() == encoded.prompt_ids
            mismatch = None if compare_tokens else f"{spec.name} tokenizes the prompts differently from the reference"
            if compare_tokens and (
                mismatch := backend.tokenizer_mismatch([loglik_prompt(item) for item in items], encoded.prompt_ids)
            ):
                compare_tokens = False
            if not compare_tokens:
                emit(
                    "warning",
                    code="tokenizer-mismatch",
                    message=f"{mismatch}: KL, Jaccard and top-1 agreement are not computed; accuracy is",
                )
        if backend.tokenizer_verified is not None:
            if backend.tokenizer_note:
                emit("warning", code="tokenizer-unverified", message=backend.tokenizer_note)
            write_json_atomic(
                folder.model_file(spec.folder, "engine.json"), backend.describe()
            )  # with what the check found
        path = folder.model_file(spec.folder, "quality.jsonl")
        done = set(read_latest_by_id(path, ItemRecord))
        if spec.is_reference and reference.create(len(items), backend.vocab_width, backend.top_logprobs) and done:
            # The stored rows behind these records are gone: score the reference again from scratch.
            path.unlink()
            done = set()
        score_items(
            backend.next_token_logprobs,
            spec.name,
            items,
            encoded,
            batch_size=job.batch_size,
            reference=reference,
            is_reference=spec.is_reference,
            compare_tokens=compare_tokens,
            done=done,
            on_batch=_phase_sink(path, "loglik", len(items), _finished(items, done)),
            top_logprobs=backend.top_logprobs,
        )

    if job.generation is not None:
        options = job.generation
        settings = resolve_settings(
            tokenizer,
            options.chat,
            options.temperature,
            options.greedy,
            options.max_new_tokens,
            job.seed,
            stop_token_ids(tokenizer, spec.tokenizer or spec.weights),
        )
        write_json_atomic(folder.model_file(spec.folder, "generation-settings.json"), settings)
        path = folder.model_file(spec.folder, "generation.jsonl")
        done = set(read_latest_by_id(path, ItemRecord))
        prompts = encode_generation_prompts(tokenizer, items, settings)
        generate_answers(
            backend.generate,
            tokenizer,
            spec.name,
            items,
            prompts,
            settings,
            batch_size=options.batch_size,
            done=done,
            on_batch=_phase_sink(path, "generation", len(items), _finished(items, done)),
        )

    if job.engine_floor:
        from quantcheck.scoring.engine_floor import floor_batch, question_floor

        _engine_floor(
            job,
            folder,
            backend,
            lambda: question_floor(
                backend.next_token_logprobs, encoded.prompt_ids, spec.name, floor_batch(job.batch_size)
            ),
        )


def _engine_info(backend, stored: Path):
    """The engine's description; a served model's tokenizer check is kept from an earlier job of this run where this
    one does not repeat it (a resumed generation), so a resume cannot forget that a tokenizer was never verified."""
    from quantcheck.schema.results import EngineInfo

    engine = backend.describe()
    if engine.tokenizer_verified is None and stored.exists():
        earlier = EngineInfo.model_validate_json(stored.read_text())
        if earlier.tokenizer_verified is not None:
            check = (
                {"tokenizer_check": earlier.parallel["tokenizer_check"]}
                if "tokenizer_check" in earlier.parallel
                else {}
            )
            engine = engine.model_copy(
                update={"tokenizer_verified": earlier.tokenizer_verified, "parallel": {**engine.parallel, **check}}
            )
    return engine


def _engine_floor(job: JobSpec, folder: RunFolder, backend, measure: Callable[[], object]) -> None:
    """Measure the model's engine floor (a NumericFloor, or None: nothing to score) once. Where the engine gives no full
    rows of its own (a server's top K), runs out of memory or has nothing to score, the reason is kept instead: the
    floor is a check on the scoring, and its failure must not cost the scores."""
    spec = job.model
    if folder.engine_floor_settled(spec.folder):
        return
    reason = "the engine returns only its top log-probabilities" if backend.top_logprobs is not None else None
    floor = None
    if reason is None:
        try:
            floor = measure()
        except (
            RuntimeError,
            MemoryError,
            ValueError,
        ) as error:  # out of memory at the batched plan, an engine's refusal
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if floor is None:
        reason = reason or "no sequence has a token to score"
        write_text_atomic(folder.engine_floor_skip_file(spec.folder), reason + "\n")
        emit(
            "warning",
            code="engine-floor",
            message=f"{spec.name}: its engine's numeric floor was not measured ({reason})",
        )
        return
    write_json_atomic(folder.engine_floor_file(spec.folder), floor)


def _finished(items, done: set[str]) -> int:
    return len(done & {item.item_id for item in items})


def run_corpus(job: JobSpec, folder: RunFolder, backend) -> None:
    """Every token of the run's sequences through one model: the reference makes them (a text's windows, or
    its answers to the prompts) and fills the store; a variant replays them."""
    from quantcheck.data.corpus import scored_count
    from quantcheck.schema.results import WindowRecord
    from quantcheck.scoring.corpus import score_windows

    spec = job.model
    sequences, firsts = (_prompt_sequences if job.corpus.kind == "prompts" else _text_windows)(job, folder, backend)
    reference = folder.reference_store()
    compare_tokens = True
    if spec.is_reference:
        folder.write_reference_tokens(sequences)
        texts = [
            [backend.tokenizer.decode([token]) for token in sequence[first + 1 :]]
            for sequence, first in zip(sequences, firsts)
        ]
        folder.write_scored_spans(firsts, texts)
    elif folder.read_reference_tokens() != sequences:
        if job.corpus.kind == "prompts":
            raise QuantcheckError(
                f"{spec.name} tokenizes the prompts differently from the reference: the reference's answer tokens "
                "cannot be replayed through it (compare it on a text corpus or on questions instead)"
            )
        compare_tokens = False
        emit(
            "warning",
            code="tokenizer-mismatch",
            message=f"{spec.name} tokenizes the {job.corpus.kind} differently from the reference: "
            "KL, top-1 agreement and delta-p are not computed; its perplexity is",
        )
    path = folder.model_file(spec.folder, "corpus.jsonl")
    done = set(read_latest_by_id(path, WindowRecord, key="window"))
    rows = scored_count(sequences, firsts)
    if spec.is_reference and reference.create(rows, backend.vocab_width, backend.top_logprobs) and done:
        path.unlink()  # the stored rows behind these records are gone: score the reference again from scratch
        done = set()
    elif not spec.is_reference:
        reference.check(rows, backend.vocab_width)
    keep = _phase_sink(path, job.corpus.kind, len(sequences), len(done & set(range(len(sequences)))))
    score_windows(
        backend.window_logprobs,
        spec.name,
        sequences,
        firsts,
        batch_size=job.batch_size,
        reference=reference,
        is_reference=spec.is_reference,
        compare_tokens=compare_tokens,
        done=done,
        on_batch=keep,
        top_logprobs=backend.top_logprobs,
    )
    if job.own_answers and not spec.is_reference:
        run_own_answers(job, folder, backend)
    if job.engine_floor:
        from quantcheck.scoring.engine_floor import sequence_floor

        _engine_floor(
            job, folder, backend, lambda: sequence_floor(backend.window_logprobs, sequences, firsts, spec.name)
        )


def _text_windows(job: JobSpec, folder: RunFolder, backend) -> tuple[list[list[int]], list[int]]:
    """The reference cuts the text (or brings its recorded windows); a variant cuts it with its own tokenizer, so a
    different one shows as a mismatch, or replays recorded windows as they are."""
    from quantcheck.data.corpus import first_scored, make_windows

    options = job.corpus
    if options.recorded:
        windows = backend.recorded_windows() if job.model.is_reference else folder.read_reference_tokens()
        windows = windows[: options.max_windows]
    else:
        windows = make_windows(backend.tokenizer, folder.read_corpus(), options.context, options.max_windows)
    return windows, [first_scored(options.context)] * len(windows)


def _prompt_setup(job: JobSpec, folder: RunFolder, backend) -> tuple[GenerationSettings, list[list[int]]]:
    """Greedy answers through the chat template (--chat), the reference's settings for every model: the prompts'
    ids as this model's tokenizer encodes them."""
    from quantcheck.scoring.generative import encode_chats, resolve_settings, stop_token_ids

    spec, options = job.model, job.corpus
    tokenizer = backend.tokenizer
    settings = resolve_settings(
        tokenizer,
        options.chat,
        0.0,
        True,
        options.max_new_tokens,
        job.seed,
        stop_token_ids(tokenizer, spec.tokenizer or spec.weights),
    )
    return settings, encode_chats(tokenizer, folder.read_prompts()[1], settings)


def _answer_batches(count: int, batch_size: int) -> list[range]:
    """The same consecutive batches for the reference's answers and each variant's own: with the same seeds, an
    identical model answers identically."""
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def _prompt_sequences(job: JobSpec, folder: RunFolder, backend) -> tuple[list[list[int]], list[int]]:
    """Each prompt followed by the reference's greedy answer; scoring starts at the prompt's last token.

    The reference generates the answers once (kept in reference/answers.json, so a resumed run and every
    variant see the same ones); a variant encodes the prompts itself, so another tokenizer shows as a mismatch.
    A prompt the reference answers with nothing at once has no token to score.
    """
    settings, prompt_ids = _prompt_setup(job, folder, backend)
    answers_file = folder.reference_dir / "answers.json"
    if job.model.is_reference and not answers_file.exists():
        emit("phase", phase="answers", total=len(prompt_ids), done=0)
        answers = []
        for batch in _answer_batches(len(prompt_ids), job.batch_size):
            answers += backend.generate(
                [prompt_ids[index] for index in batch], settings, [settings.seed + index for index in batch]
            )
            emit("advance", phase="answers", count=len(batch))
        write_json_atomic(answers_file, {"settings": settings.model_dump(), "answers": answers})
    answers = json.loads(answers_file.read_text())["answers"]
    return [ids + answer for ids, answer in zip(prompt_ids, answers)], [len(ids) - 1 for ids in prompt_ids]


def run_own_answers(job: JobSpec, folder: RunFolder, backend) -> None:
    """A variant answers every prompt greedily itself, as the reference did (`analysis.free_answers` compares
    them); each batch is kept as it finishes, so a resumed run answers only the rest."""
    settings, prompt_ids = _prompt_setup(job, folder, backend)
    path = folder.model_file(job.model.folder, "answers.jsonl")
    done = set(read_latest_by_id(path, AnswerRecord, key="prompt"))
    keep = _phase_sink(path, "own answers", len(prompt_ids), len(done & set(range(len(prompt_ids)))))
    for batch in _answer_batches(len(prompt_ids), job.batch_size):
        if set(batch) <= done:
            continue
        answers = backend.generate(
            [prompt_ids[index] for index in batch], settings, [settings.seed + index for index in batch]
        )
        keep(
            [
                AnswerRecord(
                    prompt=index,
                    model=job.model.name,
                    ids=answer,
                    pieces=[backend.tokenizer.decode([token]) for token in answer],
                )
                for index, answer in zip(batch, answers)
            ]
        )


def _phase_sink(path: Path, phase: str, total: int, done: int) -> Callable[[list], None]:
    """Announce a resumable phase and return what keeps each finished batch: append + fsync, then progress."""
    emit("phase", phase=phase, total=total, done=done)

    def keep(records: list) -> None:
        append_records(path, records)
        emit("advance", phase=phase, count=len(records))

    return keep


def run_cost(job: JobSpec, folder: RunFolder) -> None:
    from quantcheck.backends import get_backend
    from quantcheck.cost.scenario import CostSettings

    backend = get_backend(job.model.backend)(job)
    settings = CostSettings(**(job.cost or {}))
    emit("phase", phase="cost", model=job.model.name, total=len(settings.batch_sizes) + 2)
    texts = folder.cost_texts()
    cost = backend.measure_cost(texts, settings, on_step=lambda step: emit("advance", phase="cost", step=step))
    write_json_atomic(folder.cost_file(job.model.folder, job.cost_round), cost)


def main(argv: list[str]) -> int:
    spec = JobSpec.model_validate_json(Path(argv[1]).read_text())
    folder = RunFolder(Path(spec.run_dir))
    error_file = folder.model_file(spec.model.folder, f"{spec.kind}.error.json")
    error_file.unlink(missing_ok=True)
    try:
        import torch

        torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)
        (run_quality if spec.kind == "quality" else run_cost)(spec, folder)
        return 0
    except KeyboardInterrupt:
        return 130
    except QuantcheckError as error:
        write_json_atomic(error_file, {"message": str(error)})
        return 2
    except Exception as error:  # recorded for this model; the run goes on with the others
        traceback.print_exc(file=sys.stderr)
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        kind = (
            "out of memory"
            if "out of memory" in first_line.lower() or isinstance(error, MemoryError)
            else type(error).__name__
        )
        write_json_atomic(error_file, {"message": f"{kind}: {first_line}"})
        return 1


def exit_now(code: int) -> None:
    """End the worker once its files are written, skipping the interpreter's teardown when nothing it started
    outlives it: vLLM's engine shutdown alone took 6 s on CPU (a full garbage collection), torch's a few.
    An engine with processes of its own (multi-GPU, Ray) is shut down the normal way."""
    import psutil

    sys.stdout.flush()
    sys.stderr.flush()
    if not psutil.Process().children():
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv))
