"""Users' own prompts (`--dataset prompts:FILE.jsonl`): the reference answers each once, every variant is
scored on the reference's answer tokens (teacher forcing).

One chat per line, in the OpenAI messages layout:
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "id": str (optional)}
or the bare list of messages. The last message is the user's: the turn the reference answers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from quantcheck.data.files import json_lines, read_text
from quantcheck.errors import DatasetError

PROMPTS_PREFIX = "prompts:"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptSet:
    spec: str
    source: str
    chats: tuple[tuple[dict[str, str], ...], ...]
    ids: tuple[str, ...]

    @property
    def text(self) -> str:
        """Every message's content, chat after chat: the prompts as plain text (calibration data, overlap checks)."""
        return "\n\n".join(message["content"] for chat in self.chats for message in chat)

    def content_hash(self) -> str:
        payload = json.dumps(
            [{"id": id_, "messages": list(chat)} for id_, chat in zip(self.ids, self.chats)], sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_jsonl(self) -> str:
        """The run folder's prompts.jsonl: what the workers read (the inverse of `read_prompt_lines`)."""
        return "".join(
            json.dumps({"id": id_, "messages": list(chat)}, ensure_ascii=False) + "\n"
            for id_, chat in zip(self.ids, self.chats)
        )


def is_prompts(spec: str) -> bool:
    return spec.startswith(PROMPTS_PREFIX)


def load_prompts(spec: str, limit: int | None = None) -> PromptSet:
    """Read and validate `prompts:FILE.jsonl`; `limit` keeps the first N chats. Every problem names its line."""
    path = Path(spec.removeprefix(PROMPTS_PREFIX)).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"prompts file {str(path)!r} is not a file: give prompts:FILE.jsonl, "
            'one chat ({"messages": [...]}) per line'
        )
    ids, chats = read_prompt_lines(read_text(path), str(path))
    if not chats:
        raise DatasetError(
            f'{path}: no prompts: one chat per line, {{"messages": [{{"role": "user", "content": "..."}}]}}'
        )
    if limit is not None:
        ids, chats = ids[:limit], chats[:limit]
    return PromptSet(spec=spec, source=f"file {path.resolve()}", chats=tuple(chats), ids=tuple(ids))


def read_prompt_lines(text: str, where: str) -> tuple[list[str], list[tuple[dict[str, str], ...]]]:
    ids: list[str] = []
    chats: list[tuple[dict[str, str], ...]] = []
    for _, at, record in json_lines(text.splitlines(), where, ": one chat per line"):
        messages = record.get("messages") if isinstance(record, dict) else record
        chats.append(_messages(messages, at))
        ids.append(
            str(record.get("id", f"prompt-{len(ids):04d}")) if isinstance(record, dict) else f"prompt-{len(ids):04d}"
        )
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{where}: prompt ids must be unique")
    return ids, chats


def _messages(messages: object, at: str) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(
            f'{at}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} or a list of messages'
        )
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise DatasetError(f"{at}: every message needs a role ({', '.join(ROLES)}) and a content string")
    if messages[-1]["role"] != "user":
        raise DatasetError(f"{at}: the last message must be the user's: it is the turn the reference answers")
    return tuple({"role": message["role"], "content": message["content"]} for message in messages)


def last_user_message(chat: tuple[dict[str, str], ...]) -> str:
    return chat[-1]["content"]
