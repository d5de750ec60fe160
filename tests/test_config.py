from typing import Literal

import pytest
import yaml

from openft.cli import build_parser, main, spec_from_args
from openft.config import JobSpec, field_type


def test_flags_and_yaml_parse_into_the_same_spec(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: my-model\ntrain:\n  epochs: 2\n  learning_rate: 0.001\nlora:\n  rank: 4\n")
    args = build_parser().parse_args(
        [
            "finetune",
            "--config",
            str(cfg),
            "--data",
            "d.jsonl",
            "--epochs",
            "5",
            "--lora-target-modules",
            "q_proj,v_proj",
            "--batch-size",
            "auto",
        ]
    )
    spec = spec_from_args(args)
    assert spec.model == "my-model" and spec.data.path == "d.jsonl"
    assert spec.train.epochs == 5  # the flag overrides the file
    assert spec.train.learning_rate == 0.001 and spec.lora.rank == 4
    assert spec.lora.target_modules == ["q_proj", "v_proj"] and spec.train.batch_size == "auto"
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_unknown_config_keys_are_named():
    with pytest.raises(ValueError, match="epoch"):
        JobSpec.from_dict({"train": {"epoch": 3}})
    with pytest.raises(ValueError, match="unknown config key 'modle'"):
        JobSpec.from_dict({"modle": "x"})


def test_bad_number_flag_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--epochs", "three"])
    assert "expected an integer or 'auto'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        # Plain int fields once took "auto" and crashed later with a TypeError.
        ("--lora-rank", "auto", "expected an integer, got 'auto'"),
        ("--seed", "auto", "expected an integer, got 'auto'"),
        ("--max-steps", "auto", "expected an integer, got 'auto'"),
        ("--epochs", "x", "expected an integer or 'auto', got 'x'"),
        ("--batch-size", "2.5", "expected an integer or 'auto'"),
        ("--learning-rate", "nan", "expected a number or 'auto'"),
        ("--max-grad-norm", "auto", "expected a number, got 'auto'"),
        ("--lora-target-modules", ",", "expected a list of strings or 'auto'"),
        ("--scheduler", "fast", "invalid choice: 'fast'"),
    ],
)
def test_every_flag_parses_to_its_fields_type(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--data", "d.jsonl", flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {expected}" in err and "Traceback" not in err


def test_typed_flags_keep_their_types():
    args = build_parser().parse_args(
        ["finetune", "--lora-rank", "8", "--seed", "3", "--learning-rate", "2e-4", "--epochs", "auto"]
        + ["--no-train-on-prompt", "--max-grad-norm", "0.5"]
    )
    spec = spec_from_args(args)
    assert spec.lora.rank == 8 and spec.train.seed == 3 and spec.train.epochs == "auto"
    assert spec.train.learning_rate == 2e-4 and spec.train.max_grad_norm == 0.5
    assert spec.data.train_on_prompt is False


def test_list_flags_are_found_by_their_type():
    # `str | None` fields (a path, a layout) must stay strings, not lists.
    assert field_type(list[str] | Literal["auto"]).item is str
    assert field_type(str | None).item is None and field_type(str | None).optional
    args = build_parser().parse_args(["finetune", "--data", "a,b.jsonl", "--lora-target-modules", "q_proj, v_proj"])
    spec = spec_from_args(args)
    assert spec.data.path == "a,b.jsonl" and spec.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "yaml_text, named, expected",
    [
        ("lora:\n  rank: auto\n", "'lora.rank'", "expected an integer, got 'auto' (string)"),
        ("train:\n  epochs: [1]\n", "'train.epochs'", "expected an integer or 'auto', got [1] (list)"),
        ("train:\n  seed: true\n", "'train.seed'", "expected an integer, got True (boolean)"),
        ("train:\n  method: qlora\n", "'train.method'", "expected one of 'lora', 'full'"),
        ("data:\n  train_on_prompt: 1\n", "'data.train_on_prompt'", "expected true or false"),
        ("lora:\n  target_modules: q_proj\n", "'lora.target_modules'", "expected a list of strings or 'auto'"),
        ("train: 3\n", "'train'", "expected a mapping, got 3 (integer)"),
        ("lora_rank: 8\n", "'lora_rank'", "unknown config key"),
        ("train:\n  epoch: 3\n  lr: 1\n", "'train.epoch', 'train.lr'", "unknown config keys"),
    ],
)
def test_yaml_values_are_type_checked_naming_the_key(yaml_text, named, expected, tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml_text)
    assert main(["finetune", "--config", str(cfg), "--data", "d.jsonl"]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and named in err and expected in err, err


def test_yaml_numbers_become_the_fields_type():
    # PyYAML reads 1e-4 (no dot) as a string; a float field takes it as the number.
    spec = JobSpec.from_dict(yaml.safe_load("train:\n  learning_rate: 1e-4\n  max_grad_norm: 2\nlora:\n  rank: 8\n"))
    assert spec.train.learning_rate == 1e-4 and spec.train.max_grad_norm == 2.0
    assert isinstance(spec.train.max_grad_norm, float) and spec.lora.rank == 8
    assert JobSpec.from_dict({"output_dir": None}).output_dir is None
    with pytest.raises(ValueError, match="'train.learning_rate': expected a number or 'auto', got 'fast'"):
        JobSpec.from_dict({"train": {"learning_rate": "fast"}})


def test_help_shows_the_defaults_that_are_not_auto(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--lora-rank INT LoRA rank r (default: 16)" in out
    assert "(default: 0.1)" in out and "(default: 3)" in out and "(default: lora)" in out
    assert "--lora-target-modules NAME,...|auto" in out and "LORA__" not in out
    assert (
        "--epochs INT|auto" in out
        and "passes over the data; auto: 3, raised for tiny sets, lowered for big ones" in out
    )
