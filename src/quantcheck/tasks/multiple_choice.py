"""Multiple-choice questions (MMLU and question files): each model scored at the answer position by log-likelihood,
and by answers it generates; the reference's sampling run again with another seed (the sampling floor)."""

from __future__ import annotations

from pathlib import Path

from quantcheck.data.items import Dataset
from quantcheck.data.load import load_dataset
from quantcheck.data.prompts import LOGLIK_FORMAT, answer_continuations
from quantcheck.schema.jobs import JobSpec, emit
from quantcheck.schema.models import CorpusJob, ModelSpec
from quantcheck.schema.results import DatasetInfo, ItemRecord
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import read_latest_by_id, write_json_atomic
from quantcheck.tasks.base import (
    DataRequest,
    QualityRequest,
    Task,
    count_records,
    measure_engine_floor,
    phase_sink,
    recorded_ids,
)


class MultipleChoice(Task):
    name = "questions"
    unit = "questions"
    every_token = False
    job_label = "quality"
    sampling_floor = True

    def matches(self, spec: str) -> bool:
        return True  # the default kind: MMLU subjects and question files

    def load(self, request: DataRequest, model_path: Path) -> Dataset:
        return load_dataset(request.dataset, request.limit, request.seed)

    def planned_rows(self, data: Dataset) -> int:
        return len(data.items)

    def record(self, folder: RunFolder, data: Dataset) -> None:
        folder.write_dataset(data)

    def dataset_info(self, data: Dataset, folder: RunFolder, job: CorpusJob | None) -> DatasetInfo:
        return DatasetInfo(
            spec=data.spec,
            n_items=len(data.items),
            subjects=data.subjects,
            source=data.source,
            content_hash=data.content_hash(),
            prompt_format=LOGLIK_FORMAT,
            answer_continuations=answer_continuations(max(len(item.choices) for item in data.items)),
        )

    def quality_job(self, spec: ModelSpec, folder: RunFolder, request: QualityRequest) -> JobSpec | None:
        """The sampling floor re-runs the reference with its seed changed; every other model also measures its
        engine's numeric floor (two batch plans on a few items) in the same job."""
        from quantcheck.backends.variants import SAMPLING_FLOOR_SEED_OFFSET

        items = request.items
        loglik = request.loglik and spec.floor is None
        todo_loglik = loglik and count_records(folder, spec, "quality.jsonl", ItemRecord, "item_id") < items
        generation = request.generation is not None
        todo_generation = generation and count_records(folder, spec, "generation.jsonl", ItemRecord, "item_id") < items
        todo_floor = (
            request.floors and loglik and spec.measures_engine_floor() and not folder.engine_floor_settled(spec.folder)
        )
        if not (todo_loglik or todo_generation or todo_floor):
            return None
        seed = request.shared["seed"] + (SAMPLING_FLOOR_SEED_OFFSET if spec.floor == "sampling" else 0)
        return JobSpec(
            kind="quality",
            task=self.name,
            model=spec,
            loglik=todo_loglik,
            generation=request.generation if todo_generation else None,
            engine_floor=todo_floor,
            **{**request.shared, "seed": seed},
        )

    def run(self, job: JobSpec, folder: RunFolder, backend) -> None:
        from quantcheck.scoring.loglik import encode_items

        items = folder.read_items()
        encoded = encode_items(backend.tokenizer, items) if job.loglik or job.engine_floor else None
        if job.loglik:
            _score_loglik(job, folder, backend, items, encoded)
        if job.generation is not None:
            _generate(job, folder, backend, items)
        if job.engine_floor:
            from quantcheck.scoring.engine_floor import floor_batch, question_floor

            measure_engine_floor(
                job,
                folder,
                backend,
                lambda: question_floor(
                    backend.next_token_logprobs, encoded.prompt_ids, job.model.name, floor_batch(job.batch_size)
                ),
            )


def _score_loglik(job: JobSpec, folder: RunFolder, backend, items, encoded) -> None:
    """Every question's answer position: the reference fills the store, a variant is compared with it."""
    from quantcheck.data.prompts import loglik_prompt
    from quantcheck.scoring.loglik import score_items

    spec = job.model
    reference = folder.reference_store()
    prompts = lambda: [loglik_prompt(item) for item in items]  # noqa: E731
    if spec.is_reference:
        folder.write_reference_tokens(encoded.prompt_ids)
        compare_tokens = True
        if mismatch := backend.tokenizer_mismatch(prompts(), encoded.prompt_ids):
            emit(
                "warning",
                code="tokenizer-mismatch",
                message=f"{mismatch}: the served reference reads the ids as another tokenizer would",
            )
    else:
        compare_tokens = folder.read_reference_tokens() == encoded.prompt_ids
        mismatch = None if compare_tokens else f"{spec.name} tokenizes the prompts differently from the reference"
        if compare_tokens and (mismatch := backend.tokenizer_mismatch(prompts(), encoded.prompt_ids)):
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
        write_json_atomic(folder.model_file(spec.folder, "engine.json"), backend.describe())  # with what it found
    path = folder.model_file(spec.folder, "quality.jsonl")
    done = recorded_ids(job, reference, path, ItemRecord, "item_id", len(items), backend)
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
        on_batch=phase_sink(path, "loglik", len(items), finished_count(items, done)),
        top_logprobs=backend.top_logprobs,
    )


def _generate(job: JobSpec, folder: RunFolder, backend, items) -> None:
    """Every question answered freely through the run's decoding settings, the answer letter parsed from it."""
    from quantcheck.scoring.generative import (
        encode_generation_prompts,
        generate_answers,
        resolve_settings,
        stop_token_ids,
    )

    spec, options, tokenizer = job.model, job.generation, backend.tokenizer
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
    generate_answers(
        backend.generate,
        tokenizer,
        spec.name,
        items,
        encode_generation_prompts(tokenizer, items, settings),
        settings,
        batch_size=options.batch_size,
        done=done,
        on_batch=phase_sink(path, "generation", len(items), finished_count(items, done)),
    )


def finished_count(items, done: set[str]) -> int:
    """How many of `items` are already recorded."""
    return len(done & {item.item_id for item in items})
