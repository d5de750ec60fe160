"""Serving tokenizers of the same `tokenizer.json` share one backend and
vocabulary (every fine-tune saves a copy of its base's tokenizer; a Gemma 3 one
is 185 MB resident), while each keeps its own chat template; another
`tokenizer.json` gets its own."""

from __future__ import annotations

import json
import shutil

from openft.models.load import load_tokenizer


def _copy(src, dst, template: str, extra_token: str | None = None):
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if extra_token is not None:
        tj = json.loads((dst / "tokenizer.json").read_text())
        new_id = max(t["id"] for t in tj["added_tokens"]) + 1000
        tj["added_tokens"].append(
            {
                "id": new_id,
                "content": extra_token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
        (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


def test_copies_of_one_tokenizer_share_its_tables_but_not_their_templates(tiny_model_dir, tmp_path):
    a = load_tokenizer(_copy(tiny_model_dir, tmp_path / "a", "A{{ messages[0].content }}"))
    b = load_tokenizer(_copy(tiny_model_dir, tmp_path / "b", "B{{ messages[0].content }}"))
    other = load_tokenizer(_copy(tiny_model_dir, tmp_path / "c", "C", extra_token="<|extra|>"))
    assert a._tok is b._tok and a._vocab is b._vocab
    msgs = [{"role": "user", "content": "hi there"}]
    assert a.apply_chat_template(msgs, tokenize=False) == "Ahi there"
    assert b.apply_chat_template(msgs, tokenize=False) == "Bhi there"
    assert a("hello world")["input_ids"] == b("hello world")["input_ids"]
    assert other._tok is not a._tok and "<|extra|>" in other.get_vocab() and "<|extra|>" not in a.get_vocab()
