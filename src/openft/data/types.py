"""The shapes every data stage agrees on.

A dataset file is read into `Example`s (normalised conversations or plain text),
each remembering where it came from so every problem can name its file and line
or record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Location:
    """Where a record lives: `line` for line-based files (JSONL, CSV: 1-based, the
    header is line 1), `record` (0-based index) for JSON arrays, XML and Parquet."""

    file: str
    line: int | None = None
    record: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.record is not None:
            return f"{self.file}[record {self.record}]"
        return self.file


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant turn, in OpenAI's terms: `arguments` is
    the JSON text of an object (checked against the tool's schema on loading)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Message:
    role: Role
    content: str  # "" for an assistant turn that only calls tools
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns
    tool_call_id: str | None = None  # tool replies: the call answered
    name: str | None = None  # tool replies: the tool's name, where the data gives it


@dataclass
class Example:
    """One training example: a conversation (`messages`) or, for continued
    pretraining, plain `text`. Exactly one of the two is set."""

    messages: list[Message] | None = None
    text: str | None = None
    where: Location = field(default_factory=lambda: Location(""))
    tools: list[dict] | None = None  # OpenAI tool definitions {"type": "function", "function": {...}}
    # A preference pair (DPO): `messages` are the prompt and the preferred answer, whose
    # last `completion_turns` messages are the answer; `rejected` is the other answer.
    rejected: list[Message] | None = None
    completion_turns: int = 0

    @property
    def is_pair(self) -> bool:
        return self.rejected is not None

    @property
    def prompt(self) -> list[Message]:
        """A pair's prompt (the conversation before its answers)."""
        return (self.messages or [])[: len(self.messages or []) - self.completion_turns]

    @property
    def prompt_key(self) -> str:
        """What the split groups by: the conversation up to its first assistant
        turn, so rows that share a prompt land on the same side."""
        if self.messages is None:
            return (self.text or "")[:200]
        parts: list[str] = []
        for m in self.messages:
            if m.role == "assistant":
                break
            parts.append(f"{m.role}:{m.content.strip()}")
        return "\n".join(parts)


@dataclass(frozen=True)
class Problem:
    """An error or a warning, with its place: file, line or record, field."""

    message: str
    file: str | None = None
    line: int | None = None
    record: int | None = None
    field: str | None = None
    column: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def __str__(self) -> str:
        where = self.file or ""
        if self.line is not None:
            where += f":{self.line}" + (f":{self.column}" if self.column is not None else "")
        elif self.record is not None:
            where += f" record {self.record}"
        if self.field:
            where += f" field '{self.field}'"
        return f"{where}: {self.message}" if where else self.message
