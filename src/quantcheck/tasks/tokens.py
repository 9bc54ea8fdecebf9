"""What the two kinds that score every token share (a text's windows, the reference's answers to prompts): the
reference makes the sequences and fills the store once; every variant replays the same token ids."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

from quantcheck.schema.jobs import EngineTables, JobSpec, emit
from quantcheck.schema.models import CorpusJob, ModelSpec
from quantcheck.schema.results import AnswerRecord, WindowRecord
from quantcheck.storage.folder import RunFolder
from quantcheck.tasks.base import QualityRequest, Task, count_records, measure_engine_floor, phase_sink, recorded_ids


class EveryToken(Task):
    """A kind whose sequences are scored token by token; `sequences` says where they come from."""

    every_token = True
    job_label = "corpus"
    title: ClassVar[str]
    """The report's name for what was scored."""
    how_scored: ClassVar[str]
    """Which of each sequence's tokens are scored, in the report's words."""
    along: ClassVar[str]
    """Where the scored tokens lie, in the report's words."""
    fixed_length: ClassVar[bool]
    """Every sequence has the same length (a text's windows), which the report then states."""

    def check_models(self, job: CorpusJob | None, checkpoint, models: list[ModelSpec], engines: EngineTables) -> None:
        """Every engine in the run must score every token (a server: its prompt log-probabilities)."""
        from quantcheck.backends import get_backend

        for spec in models:
            get_backend(spec.backend).check_text(spec)

    def evaluated_text(self, data) -> str:
        return data.text

    def stored_rows(self, folder: RunFolder, data) -> int | None:
        """Known once the reference has made its sequences."""
        from quantcheck.data.corpus import scored_count

        if not folder.reference_tokens_exist():
            return None
        return scored_count(folder.read_reference_tokens(), folder.read_scored_spans()[0])

    def reference_key(self, job: CorpusJob | None) -> dict:
        return {"prompt_format": job.kind, "corpus": job.model_dump()}

    def quality_job(self, spec: ModelSpec, folder: RunFolder, request: QualityRequest) -> JobSpec | None:
        """Each model's pass over the sequences (and its engine's numeric floor, and where the kind has them a variant's
        own answers)."""
        todo_floor = request.floors and spec.measures_engine_floor(every_token=True)
        todo_floor = todo_floor and not folder.engine_floor_settled(spec.folder)
        answers = request.own_answers and not spec.is_reference
        if folder.reference_tokens_exist() and not todo_floor:
            sequences = len(folder.read_reference_tokens())
            scored = count_records(folder, spec, "corpus.jsonl", WindowRecord, "window") >= sequences
            answered = not answers or count_records(folder, spec, "answers.jsonl", AnswerRecord, "prompt") >= sequences
            if scored and answered:
                return None
        return JobSpec(
            kind="quality",
            task=self.name,
            model=spec,
            loglik=False,
            corpus=request.corpus,
            engine_floor=todo_floor,
            own_answers=answers,
            **request.shared,
        )

    @abstractmethod
    def sequences(self, job: JobSpec, folder: RunFolder, backend) -> tuple[list[list[int]], list[int]]:
        """The model's token ids of every sequence, and the position each one's scoring starts at."""

    @abstractmethod
    def sequence_names(self, folder: RunFolder, count: int) -> list[str]:
        """How the report names each sequence."""

    def differently_tokenized(self, spec: ModelSpec) -> None:
        """A variant whose tokenizer makes other ids: its perplexity is still comparable, the rest is not."""
        emit(
            "warning",
            code="tokenizer-mismatch",
            message=f"{spec.name} tokenizes the {self.name} differently from the reference: "
            "KL, top-1 agreement and delta-p are not computed; its perplexity is",
        )

    def after_scoring(self, job: JobSpec, folder: RunFolder, backend) -> None:
        """What a model does once its sequences are scored (nothing, unless the kind says)."""
        return None

    def run(self, job: JobSpec, folder: RunFolder, backend) -> None:
        """Every token of the run's sequences through one model: the reference makes them and fills the store; a
        variant replays them."""
        from quantcheck.data.corpus import scored_count
        from quantcheck.scoring.corpus import score_windows

        spec = job.model
        sequences, firsts = self.sequences(job, folder, backend)
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
            self.differently_tokenized(spec)
            compare_tokens = False
        path = folder.model_file(spec.folder, "corpus.jsonl")
        rows = scored_count(sequences, firsts)
        done = recorded_ids(job, reference, path, WindowRecord, "window", rows, backend)
        if not spec.is_reference:
            reference.check(rows, backend.vocab_width)
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
            on_batch=phase_sink(path, self.name, len(sequences), len(done & set(range(len(sequences))))),
            top_logprobs=backend.top_logprobs,
        )
        self.after_scoring(job, folder, backend)
        if job.engine_floor:
            from quantcheck.scoring.engine_floor import sequence_floor

            measure_engine_floor(
                job, folder, backend, lambda: sequence_floor(backend.window_logprobs, sequences, firsts, spec.name)
            )
