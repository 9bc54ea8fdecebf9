"""Users' own prompts (`--dataset prompts:FILE.jsonl`): the reference answers each greedily through the chat template,
every model is scored on the answer's tokens, and each variant also answers on its own (`analysis.free_answers`)."""

from __future__ import annotations

import json
from pathlib import Path

from quantcheck.data.chats import PromptSet, is_prompts, load_prompts
from quantcheck.errors import QuantcheckError
from quantcheck.schema.jobs import JobSpec, emit
from quantcheck.schema.models import CorpusJob, GenerationOptions, ModelSpec
from quantcheck.schema.results import AnswerRecord, DatasetInfo, GenerationSettings
from quantcheck.storage.folder import RunFolder
from quantcheck.storage.store import read_latest_by_id, write_json_atomic
from quantcheck.tasks.base import DataRequest, phase_sink
from quantcheck.tasks.tokens import EveryToken


class Prompts(EveryToken):
    name = "prompts"
    unit = "prompts"
    title = "Your prompts"
    how_scored = "the reference's greedy answers scored"
    along = "along the reference's answers"
    fixed_length = False
    own_answers = True

    def matches(self, spec: str) -> bool:
        return is_prompts(spec)

    def load(self, request: DataRequest, model_path: Path) -> PromptSet:
        return load_prompts(request.dataset, request.limit)

    def corpus_job(self, request: DataRequest) -> CorpusJob:
        """The generation options say how the reference answers."""
        answers = request.generation or GenerationOptions()
        return CorpusJob(kind=self.name, chat=answers.chat, max_new_tokens=answers.max_new_tokens)

    def record(self, folder: RunFolder, data: PromptSet) -> None:
        folder.write_prompts(data)

    def dataset_info(self, data: PromptSet, folder: RunFolder, job: CorpusJob) -> DatasetInfo:
        return DatasetInfo(
            spec=data.spec,
            kind=self.name,
            n_items=len(data.chats),
            subjects=[],
            source=data.source,
            content_hash=data.content_hash(),
            answer_continuations=[],
            prompt_format=f"each chat through the chat template (--chat {job.chat}), answered greedily by the "
            f"reference (at most {job.max_new_tokens} tokens); every model scored on the answer's tokens",
        )

    def sequences(self, job: JobSpec, folder: RunFolder, backend) -> tuple[list[list[int]], list[int]]:
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
            for batch in answer_batches(len(prompt_ids), job.batch_size):
                answers += backend.generate(
                    [prompt_ids[index] for index in batch], settings, [settings.seed + index for index in batch]
                )
                emit("advance", phase="answers", count=len(batch))
            write_json_atomic(answers_file, {"settings": settings.model_dump(), "answers": answers})
        answers = json.loads(answers_file.read_text())["answers"]
        return [ids + answer for ids, answer in zip(prompt_ids, answers)], [len(ids) - 1 for ids in prompt_ids]

    def sequence_names(self, folder: RunFolder, count: int) -> list[str]:
        return folder.read_prompts()[0]

    def differently_tokenized(self, spec: ModelSpec) -> None:
        raise QuantcheckError(
            f"{spec.name} tokenizes the prompts differently from the reference: the reference's answer tokens "
            "cannot be replayed through it (compare it on a text corpus or on questions instead)"
        )

    def after_scoring(self, job: JobSpec, folder: RunFolder, backend) -> None:
        if job.own_answers and not job.model.is_reference:
            _own_answers(job, folder, backend)


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


def answer_batches(count: int, batch_size: int) -> list[range]:
    """The same consecutive batches for the reference's answers and each variant's own: with the same seeds, an
    identical model answers identically."""
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def _own_answers(job: JobSpec, folder: RunFolder, backend) -> None:
    """A variant answers every prompt greedily itself, as the reference did (`analysis.free_answers` compares
    them); each batch is kept as it finishes, so a resumed run answers only the rest."""
    settings, prompt_ids = _prompt_setup(job, folder, backend)
    path = folder.model_file(job.model.folder, "answers.jsonl")
    done = set(read_latest_by_id(path, AnswerRecord, key="prompt"))
    keep = phase_sink(path, "own answers", len(prompt_ids), len(done & set(range(len(prompt_ids)))))
    for batch in answer_batches(len(prompt_ids), job.batch_size):
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
