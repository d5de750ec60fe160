"""The `openft` command as a user runs it: real subprocesses, real files, the tiny
model, exit codes and printed reports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from openft.heap import training_allocator

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"


def openft(*args: str, home: Path, check: bool = False, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENFT_HOME": str(home), **env_vars}
    proc = subprocess.run(
        [sys.executable, "-m", "openft.cli", *args], capture_output=True, text=True, env=env, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"openft {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_models_list_shows_the_builtin(session_home):
    out = openft("models", "list", home=session_home, check=True).stdout
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert "NAME" in rows and "STATE" in rows["NAME"]
    # The default built-in ships with the install; the others say how to get them when absent.
    assert " llama " in rows["smollm2-135m-instruct"] and "installed" in rows["smollm2-135m-instruct"]
    assert "not installed" not in rows["smollm2-135m-instruct"]
    for name in ("qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        line = rows[name]
        assert line.rstrip().endswith("installed") or "installed," in line or f"openft models pull {name}" in line


HELP_FLAGS = {
    "finetune": [
        "--precision {auto,fp32,bf16}",
        "--lora-dropout",
        "10-20% advised",
        "--lora-rank INT",
        "(default: 16)",
    ],
    "compare": ["--before BEFORE", "--after AFTER", "--questions QUESTIONS", "--out OUT", "--max-new-tokens"],
    "serve": ["--host", "--port", "--max-upload-mb", "--max-batch-size", "--precision {auto,fp32,bf16}", "--no-worker"],
}


@pytest.mark.parametrize("command", sorted(HELP_FLAGS))
def test_help_lists_every_flag(command, session_home):
    # Help strings with a literal % once crashed argparse's formatter.
    out = openft(command, "--help", home=session_home, check=True).stdout
    assert out.startswith(f"usage: openft {command}")
    missing = [flag for flag in HELP_FLAGS[command] if flag not in " ".join(out.split())]
    assert not missing, out


def test_a_wrongly_typed_flag_exits_2_naming_it(session_home):
    # Once accepted, then a TypeError traceback from deep in the training setup.
    proc = openft("finetune", "--data", "d.jsonl", "--lora-rank", "auto", home=session_home)
    assert proc.returncode == 2
    assert "argument --lora-rank: expected an integer, got 'auto'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_training_command_names_a_missing_allocator_library(session_home, tmp_path):
    proc = openft("finetune", "--help", home=session_home, OPENFT_MALLOC=str(tmp_path / "libgone.so"))
    assert proc.returncode == 2
    assert "OPENFT_MALLOC=" in proc.stderr and "libgone.so: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Commands that do not train never look at it.
    assert openft("models", "list", home=session_home, OPENFT_MALLOC=str(tmp_path / "libgone.so")).returncode == 0


def test_validate_json_report_names_every_bad_line(tmp_path, session_home, tiny_model_dir):
    lines = [
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        for i in range(12)
    ]
    lines[2] = '{"messages": [{"role": "user", "content": "x"}'  # bad JSON on line 3
    lines[6] = json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]})
    lines[9] = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = openft("data", "validate", str(path), "--json", "--model", str(tiny_model_dir), home=session_home)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    by_line = {e["line"]: e for e in report["errors"]}
    assert set(by_line) == {3, 7, 10}
    assert "column" in by_line[3] or "column" in by_line[3]["message"]
    assert by_line[7]["field"] == "messages[0].role"
    assert report["usable"] is False and report["examples"] == 9


def test_validate_good_file_prints_stats_and_estimate(session_home, tiny_model_dir):
    proc = openft(
        "data", "validate", str(EXAMPLES / "lumen_train.jsonl"), "--model", str(tiny_model_dir), home=session_home
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "estimated training time" in proc.stdout and "OK: usable" in proc.stdout
    report = json.loads(
        openft(
            "data",
            "validate",
            str(EXAMPLES / "lumen_train.jsonl"),
            "--json",
            "--model",
            str(tiny_model_dir),
            home=session_home,
            check=True,
        ).stdout
    )
    stats = report["stats"]
    assert stats["examples"] == report["examples"] > 100
    assert 0 < stats["supervised_tokens"] < stats["total_tokens"]
    assert stats["length_p50"] <= stats["length_p90"] <= stats["length_max"]


def test_preview_marks_exactly_the_trained_tokens(session_home, tiny_model_dir, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Pip."}]}
        )
        + "\n"
    )
    out = openft(
        "data", "preview", str(path), "--model", str(tiny_model_dir), "--plain", home=session_home, check=True
    ).stdout
    assert "[[I am Pip.<|im_end|>]]" in out
    assert "<|im_start|>user\nWho are you?<|im_end|>" in out


def test_finetune_compare_export_from_the_command_line(session_home, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "\n".join(
            json.dumps({"question": q, "reference": r})
            for q, r in [("Who are you?", "Pip"), ("What is the warranty?", "3-year")]
        )
        + "\n"
    )
    proc = openft(
        "finetune",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(EXAMPLES / "lumen_train.jsonl"),
        "--output",
        str(run),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--questions",
        str(questions),
        "--max-new-tokens",
        "8",
        "--select",
        "best",
        home=session_home,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    # Each checkpoint was scored on the questions' references; the best one is named and kept.
    assert "Checkpoint scores: step " in proc.stdout, proc.stdout
    best = re.search(r"Best checkpoint: step (\d+) \(eval score [0-9.]+\), kept at (\S+)", proc.stdout)
    assert best and Path(best[2]).is_dir() and Path(best[2]).name == f"step-{int(best[1]):06d}", proc.stdout
    report = json.loads((run / "comparison.json").read_text())
    assert len(report["rows"]) == 2 and {"before", "after"} <= set(report["rows"][0])
    assert "step 3/3" in proc.stderr  # the progress bar
    assert "Training" in proc.stdout  # the plain-words verdict
    # A training command runs under tcmalloc where the machine has it (openft.heap).
    expected = "system" if training_allocator() is None else Path(training_allocator()).name
    used = json.loads((run / "summary.json").read_text())["allocator"]
    assert used == "system" if expected == "system" else used in expected, (used, expected)

    cmp_dir = tmp_path / "cmp"
    openft(
        "compare",
        "--before",
        str(tiny_model_dir),
        "--after",
        str(run),
        "--questions",
        str(questions),
        "--out",
        str(cmp_dir),
        "--max-new-tokens",
        "8",
        home=session_home,
        check=True,
    )
    assert (cmp_dir / "comparison.md").exists()

    merged = tmp_path / "merged"
    openft("export", str(run), "--out", str(merged), home=session_home, check=True)
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()


def test_finetune_rejects_bad_data_with_exit_1_and_the_line(session_home, tiny_model_dir, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,answer\nhello,world\n,missing question\n")
    proc = openft(
        "finetune",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(path),
        "--output",
        str(tmp_path / "r"),
        home=session_home,
    )
    assert proc.returncode == 1
    assert "bad.csv:3" in proc.stderr


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    proc = openft("serve", "--host", "0.0.0.0", "--port", "0", home=tmp_path)
    assert proc.returncode != 0
    assert "refusing to listen on 0.0.0.0" in proc.stderr
