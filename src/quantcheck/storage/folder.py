"""Where each file of a run lives, and the checks that keep one folder to one experiment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from quantcheck.data.chats import PromptSet, last_user_message, read_prompt_lines
from quantcheck.data.corpus import TextCorpus
from quantcheck.data.items import Dataset, Item, item_from_json
from quantcheck.errors import ResultsFolderError
from quantcheck.storage.store import (
    ReferenceStore,
    StoreSettings,
    open_reference_store,
    write_json_atomic,
    write_text_atomic,
)


def make_folder(root: Path) -> None:
    """Create --out (and its parents), or say in one line why it cannot be."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ResultsFolderError(f"cannot create --out {root}: {error.strerror}; choose a writable folder") from None


class RunFolder:
    """A run's folder: one per experiment (model + data set), resumable with the same --out."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def lock_file(self) -> Path:
        """Held by the run writing this folder (`storage.lock.RunLock`); never cleared with the folder."""
        return self.root / "run.lock"

    @property
    def dataset_file(self) -> Path:
        return self.root / "dataset.jsonl"

    @property
    def corpus_file(self) -> Path:
        return self.root / "corpus.txt"

    @property
    def prompts_file(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def sensitivity_file(self) -> Path:
        """`quantcheck sensitivity`'s per-layer table and its measured mixed-precision proposals."""
        return self.root / "sensitivity.json"

    @property
    def sensitivity_log(self) -> Path:
        """What the libraries printed while `quantcheck sensitivity` loaded its two models in its own process."""
        return self.root / "sensitivity.log"

    @property
    def reference_dir(self) -> Path:
        return self.root / "reference"

    def reference_store(self) -> ReferenceStore:
        """The store chosen once for this run, as its reference key records it."""
        key = json.loads((self.reference_dir / "key.json").read_text())
        return open_reference_store(self.reference_dir, StoreSettings.model_validate(key["reference_store"]))

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model_dir(self, model_name: str) -> Path:
        return self.models_dir / model_name

    def model_file(self, model_name: str, name: str) -> Path:
        return self.model_dir(model_name) / name

    def offload_dir(self, model_name: str) -> Path:
        """Where accelerate writes the weights an offloaded model's device cannot hold: emptied when its worker starts
        and removed when it exits, however it exits."""
        return self.model_dir(model_name) / "offload"

    def drop_model(self, model_name: str) -> None:
        """Forget everything one model recorded (its scores, answers, cost and making), to measure it afresh."""
        shutil.rmtree(self.model_dir(model_name), ignore_errors=True)

    def cost_file(self, model_name: str, cost_round: int) -> Path:
        """Round 1 is cost.json (as before rounds existed); later rounds cost-round2.json, ..."""
        return self.model_file(model_name, "cost.json" if cost_round == 1 else f"cost-round{cost_round}.json")

    def engine_floor_file(self, model_name: str) -> Path:
        """The model scored twice by its own engine with two batch plans (`NumericFloor`)."""
        return self.model_file(model_name, "engine-floor.json")

    def engine_floor_skip_file(self, model_name: str) -> Path:
        """Why the model's engine floor could not be measured (it ran out of memory, or had nothing to score)."""
        return self.model_file(model_name, "engine-floor.skipped")

    def engine_floor_settled(self, model_name: str) -> bool:
        """Measured, or tried and skipped with a reason: either way a resumed run does not try again."""
        return self.engine_floor_file(model_name).exists() or self.engine_floor_skip_file(model_name).exists()

    def prepare(self, identity: dict[str, str], force: bool) -> bool:
        """Create the folder or accept it for resuming; return True when it already held this run.

        A folder from another experiment (other model or data set) is refused unless --force,
        which starts it afresh: results of two experiments are never mixed.
        """
        make_folder(self.root)
        if self.run_file.exists():
            previous = json.loads(self.run_file.read_text())
            if previous == identity:
                return True
            if not force:
                changed = ", ".join(
                    f"{key} {previous.get(key)!r} -> {value!r}"
                    for key, value in identity.items()
                    if previous.get(key) != value
                )
                raise ResultsFolderError(
                    f"{self.root} holds a different run ({changed}): "
                    "choose another --out, or pass --force to overwrite it"
                )
            self.clear()
        else:
            self.refuse_foreign(force)
        write_json_atomic(self.run_file, identity)
        return False

    def refuse_foreign(self, force: bool) -> None:
        """A folder that holds files (its lock aside) but no run is refused unless --force: quantcheck never writes
        into someone else's folder."""
        if self.run_file.exists() or force or not self.root.is_dir():
            return
        if any(child != self.lock_file for child in self.root.iterdir()):
            raise ResultsFolderError(
                f"{self.root} is not empty and is not a quantcheck run: choose another --out, or pass --force"
            )

    def clear(self) -> None:
        for child in self.root.iterdir():
            if child != self.lock_file:
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def check_reference_key(self, key: dict[str, object]) -> str | None:
        """Drop stored outputs computed under another key; return why, or None when they still hold."""
        key_file = self.reference_dir / "key.json"
        reason = None
        if key_file.exists():
            previous = json.loads(key_file.read_text())
            if previous != key:
                changed = [
                    f"{name} {previous.get(name)!r} -> {value!r}"
                    for name, value in key.items()
                    if previous.get(name) != value
                ]
                reason = "stored outputs were computed under another setting (" + ", ".join(changed) + "): recomputing"
                shutil.rmtree(self.reference_dir)
                shutil.rmtree(self.models_dir, ignore_errors=True)
        write_json_atomic(key_file, key)
        return reason

    def check_generation_key(self, key: dict[str, object]) -> str | None:
        """Drop every model's generated answers when the generation settings changed; return why."""
        key_file = self.root / "generation-key.json"
        reason = None
        if key_file.exists() and (previous := json.loads(key_file.read_text())) != key:
            changed = [
                f"{name} {previous.get(name)!r} -> {value!r}"
                for name, value in key.items()
                if previous.get(name) != value
            ]
            reason = "generated answers were made under other settings (" + ", ".join(changed) + "): generating again"
            for path in [
                *self.models_dir.glob("*/generation.jsonl"),
                *self.models_dir.glob("*/generation-settings.json"),
            ]:
                path.unlink()
        write_json_atomic(key_file, key)
        return reason

    def write_dataset(self, dataset: Dataset) -> None:
        write_text_atomic(
            self.dataset_file, "".join(json.dumps(item.to_json(), ensure_ascii=False) + "\n" for item in dataset.items)
        )

    def write_corpus(self, corpus: TextCorpus) -> None:
        write_text_atomic(self.corpus_file, corpus.text)

    def read_corpus(self) -> str:
        return self.corpus_file.read_text(encoding="utf-8")

    def write_prompts(self, prompts: PromptSet) -> None:
        write_text_atomic(self.prompts_file, prompts.to_jsonl())

    def read_prompts(self) -> tuple[list[str], list[tuple[dict[str, str], ...]]]:
        """(ids, chats) of the run's prompts file."""
        return read_prompt_lines(self.prompts_file.read_text(encoding="utf-8"), str(self.prompts_file))

    def cost_texts(self, count: int = 64, characters: int = 1000) -> list[str]:
        """The texts the cost phase times: the questions, the prompts' last user turns, or the corpus cut into
        `count` pieces."""
        if self.prompts_file.exists():
            return [last_user_message(chat) for chat in self.read_prompts()[1][:count]]
        if not self.corpus_file.exists():
            return [item.question for item in self.read_items()]
        text = self.read_corpus()
        return [
            piece
            for start in range(0, min(len(text), count * characters), characters)
            if (piece := text[start : start + characters].strip())
        ]

    def read_items(self) -> tuple[Item, ...]:
        with self.dataset_file.open(encoding="utf-8") as handle:
            return tuple(item_from_json(json.loads(line)) for line in handle if line.strip())

    def reference_tokens_exist(self) -> bool:
        return (self.reference_dir / "tokens.json").exists()

    def write_scored_spans(self, firsts: list[int], token_texts: list[list[str]]) -> None:
        """Where scoring starts in each sequence of tokens.json, and the text of each scored token (for the report's
        worst spans)."""
        write_text_atomic(
            self.reference_dir / "scored.json",
            json.dumps({"first": firsts, "token_texts": token_texts}, ensure_ascii=False),
        )

    def read_scored_spans(self) -> tuple[list[int], list[list[str]]]:
        spans = json.loads((self.reference_dir / "scored.json").read_text(encoding="utf-8"))
        return spans["first"], spans["token_texts"]

    def write_reference_tokens(self, prompt_ids: list[list[int]]) -> None:
        write_text_atomic(self.reference_dir / "tokens.json", json.dumps(prompt_ids))

    def read_reference_tokens(self) -> list[list[int]]:
        return json.loads((self.reference_dir / "tokens.json").read_text())
