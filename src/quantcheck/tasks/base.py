"""What a data set kind is (lm-eval's Task, cut to what quantcheck compares): how it is named and loaded, what the run
checks and records before any model loads, what each model's quality job holds, what that job does in the worker, and
the words its results are read in. The runner, the worker, the summary and the report ask the run's task instead of
testing the kind themselves, so a new kind (GSM8K-style generated answers, say) is one module, one registry line and its
name in `schema.results.DatasetKind`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from quantcheck.schema.jobs import EngineTables, JobSpec, emit
from quantcheck.schema.models import CorpusJob, GenerationOptions, ModelSpec
from quantcheck.schema.results import DatasetInfo, DatasetKind
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import append_records, read_latest_by_id, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from quantcheck.models.loading import ResolvedModel


class Data(Protocol):
    """A loaded data set, as the run sees it: the kind's own type (questions, a text, prompts) behind it."""

    spec: str

    def content_hash(self) -> str: ...


@dataclass(frozen=True)
class DataRequest:
    """The run options a task reads its data set and its job settings from."""

    dataset: str
    limit: int | None
    seed: int
    context: int
    reference_kld: str | None
    generation: GenerationOptions | None
    trust_remote_code: bool


@dataclass(frozen=True)
class QualityRequest:
    """What the run asks of every model's quality job, whatever the kind."""

    loglik: bool
    generation: GenerationOptions | None
    floors: bool
    items: int
    """Questions in the data set (0 for the every-token kinds, whose sequences the reference makes)."""
    corpus: CorpusJob | None
    own_answers: bool
    shared: dict = field(default_factory=dict)
    """The JobSpec fields every job of the run shares (run_dir, device, dtype, threads, seed, engine, batch_size...)."""


class Task(ABC):
    """One data set kind. Class attributes are the facts a results.json of this kind is read with."""

    name: ClassVar[DatasetKind]
    """`DatasetInfo.kind` in results.json."""
    unit: ClassVar[str]
    """What the run's intervals resample, in the verdict's words (questions, windows, prompts)."""
    every_token: ClassVar[bool]
    """Scores every token of sequences (a text, the reference's answers) instead of the answer position of questions:
    no accuracy, items or choices; a server's rows are its prompt log-probabilities."""
    job_label: ClassVar[str]
    """The quality job's name in the line that says a model's job is already finished."""
    sampling_floor: ClassVar[bool] = False
    """The reference run again with another seed, to see what sampling alone changes (generated answers only)."""
    own_answers: ClassVar[bool] = False
    """The kind can have each variant also answer on its own (done when the run asks for generation)."""

    @abstractmethod
    def matches(self, spec: str) -> bool:
        """Whether `--dataset spec` names a data set of this kind."""

    @abstractmethod
    def load(self, request: DataRequest, model_path: Path) -> Data:
        """The data set, read and checked (`model_path` gives a recorded text its tokenizer)."""

    def corpus_job(self, request: DataRequest) -> CorpusJob | None:
        """The job settings of a kind that scores every token; None for questions."""
        return None

    def check_models(
        self, job: CorpusJob | None, checkpoint: ResolvedModel, models: list[ModelSpec], engines: EngineTables
    ) -> None:
        """Before any model loads: refuse engines or settings this kind cannot run on (questions run on all)."""
        return None

    def evaluated_text(self, data: Data) -> str | None:
        """The text a model is judged on, where there is one (a calibration on it flatters the variant)."""
        return None

    def planned_rows(self, data: Data) -> int | None:
        """The reference store's rows, where they are known before any tokenizer runs."""
        return None

    def stored_rows(self, folder: RunFolder, data: Data) -> int | None:
        """The rows the run's reference store must hold now (None: not known yet)."""
        return self.planned_rows(data)

    def reference_key(self, job: CorpusJob | None) -> dict:
        """What, beyond the run's identity, makes the reference's stored numbers this kind's."""
        return {}

    @abstractmethod
    def record(self, folder: RunFolder, data: Data) -> None:
        """Keep the data set in the run folder, where the workers read it."""

    @abstractmethod
    def dataset_info(self, data: Data, folder: RunFolder, job: CorpusJob | None) -> DatasetInfo:
        """What results.json says of the data set."""

    @abstractmethod
    def quality_job(self, spec: ModelSpec, folder: RunFolder, request: QualityRequest) -> JobSpec | None:
        """`spec`'s quality job, holding only what is not yet on disk; None when everything is."""

    @abstractmethod
    def run(self, job: JobSpec, folder: RunFolder, backend) -> None:
        """The quality job, in the worker, through a loaded backend; each finished batch kept as it finishes."""


def phase_sink(path: Path, phase: str, total: int, done: int) -> Callable[[list], None]:
    """Announce a resumable phase and return what keeps each finished batch: append + fsync, then progress."""
    emit("phase", phase=phase, total=total, done=done)

    def keep(records: list) -> None:
        append_records(path, records)
        emit("advance", phase=phase, count=len(records))

    return keep


def recorded_ids(job: JobSpec, reference, path: Path, record: type, key: str, rows: int, backend) -> set:
    """The ids `path` already holds. The reference first makes its store for `rows` rows; where the store is new, the
    rows behind those records are gone, so the records go too and the reference scores every item again."""
    done = set(read_latest_by_id(path, record, key=key))
    if job.model.is_reference and reference.create(rows, backend.vocab_width, backend.top_logprobs) and done:
        path.unlink()
        return set()
    return done


def count_records(folder: RunFolder, spec: ModelSpec, file: str, record: type, key: str) -> int:
    return len(read_latest_by_id(folder.model_file(spec.folder, file), record, key))


def measure_engine_floor(job: JobSpec, folder: RunFolder, backend, measure: Callable[[], object]) -> None:
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
