"""A text scored at every token (`--dataset text:FILE`, or a llama-perplexity base file's windows): llama-perplexity's
windows, the second half of each scored."""

from __future__ import annotations

from pathlib import Path

from quantcheck.data.corpus import KLD_PREFIX, TextCorpus, is_corpus, load_corpus
from quantcheck.errors import QuantcheckError
from quantcheck.schema.jobs import EngineTables, JobSpec
from quantcheck.schema.models import CorpusJob, ModelSpec
from quantcheck.schema.results import DatasetInfo
from quantcheck.storage.folder import RunFolder
from quantcheck.tasks.base import DataRequest
from quantcheck.tasks.tokens import EveryToken


class Text(EveryToken):
    name = "text"
    unit = "windows"
    title = "Text corpus"
    how_scored = "the second half of each scored"
    along = "along the text"
    fixed_length = True

    def matches(self, spec: str) -> bool:
        return is_corpus(spec)

    def load(self, request: DataRequest, model_path: Path) -> TextCorpus:
        if request.dataset.startswith(KLD_PREFIX):
            from quantcheck.backends.kldfile import recorded_corpus

            return recorded_corpus(request.dataset, model_path, request.trust_remote_code)
        return load_corpus(request.dataset)

    def corpus_job(self, request: DataRequest) -> CorpusJob:
        return CorpusJob(
            kind=self.name,
            context=request.context,
            max_windows=request.limit,
            recorded=request.reference_kld is not None,
        )

    def check_models(self, job: CorpusJob, checkpoint, models: list[ModelSpec], engines: EngineTables) -> None:
        """Also: a window longer than the model was trained for (or than its engine is set up for) is refused;
        positions past the model's limit would be scored on extrapolated position encodings."""
        from quantcheck.backends import get_backend
        from quantcheck.models.plan import read_config

        super().check_models(job, checkpoint, models, engines)
        context = job.context
        config = read_config(checkpoint.path) or {}
        limit = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
            "max_position_embeddings"
        )
        if limit and context > limit:
            raise QuantcheckError(
                f"--context {context} is above {checkpoint.name}'s limit of {limit} tokens (max_position_embeddings in "
                f"its config.json): choose --context {limit} or less"
            )
        for spec in models:
            backend = get_backend(spec.backend)
            planned = backend.context_limit(backend.engine_settings(engines))
            if planned and context > planned[0]:
                limit, holder, option = planned
                raise QuantcheckError(
                    f"--context {context} is longer than {holder} ({option} {limit}): "
                    f"raise {option} to {context} or more"
                )

    def record(self, folder: RunFolder, data: TextCorpus) -> None:
        folder.write_corpus(data)

    def dataset_info(self, data: TextCorpus, folder: RunFolder, job: CorpusJob) -> DatasetInfo:
        windows = len(folder.read_reference_tokens()) if folder.reference_tokens_exist() else 0
        return DatasetInfo(
            spec=data.spec,
            kind=self.name,
            n_items=windows,
            subjects=[],
            source=data.source,
            content_hash=data.content_hash(),
            prompt_format=f"windows of {job.context} tokens cut from the tokenized text, the second half of each "
            "scored (llama-perplexity)",
            answer_continuations=[],
            context=job.context,
        )

    def sequences(self, job: JobSpec, folder: RunFolder, backend) -> tuple[list[list[int]], list[int]]:
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

    def sequence_names(self, folder: RunFolder, count: int) -> list[str]:
        return [f"window {index}" for index in range(count)]
