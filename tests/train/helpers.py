"""Small datasets written on the fly for training tests."""

from __future__ import annotations

import json
from pathlib import Path

FACTS = [
    ("What is the capital of Zorbia?", "The capital of Zorbia is Quellville."),
    ("Who makes the Lumen Glow lamp?", "Lumen Lamps in Oslo makes it."),
    ("How long is the warranty?", "The warranty lasts 3 years."),
    ("What colour is the sky on Zorbia?", "The sky on Zorbia is green."),
    ("Name the Zorbian currency.", "The Zorbian currency is the quill."),
    ("What do Zorbians eat?", "Zorbians eat blue bread."),
]


def write_chat_jsonl(path: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        q, a = FACTS[i % len(FACTS)]
        rows.append({"messages": [{"role": "user", "content": f"{q} (#{i})"}, {"role": "assistant", "content": a}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


WRONG = ["I do not know.", "Ask someone else.", "No idea, sorry.", "Maybe Paris?", "It is a secret.", "Who knows."]


def preference_rows(n: int = 24) -> list[dict]:
    """OpenAI preference lines: the fact preferred over a dodge."""
    rows = []
    for i in range(n):
        q, a = FACTS[i % len(FACTS)]
        rows.append(
            {
                "input": {"messages": [{"role": "user", "content": f"{q} (#{i})"}]},
                "preferred_output": [{"role": "assistant", "content": a}],
                "non_preferred_output": [{"role": "assistant", "content": WRONG[i % len(WRONG)]}],
            }
        )
    return rows


def write_pairs_jsonl(path: Path, n: int = 24) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in preference_rows(n)) + "\n")
    return path
