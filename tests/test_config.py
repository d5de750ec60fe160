import pytest

from openft.cli import build_parser, spec_from_args
from openft.config import JobSpec


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
    assert "expected a number or 'auto'" in capsys.readouterr().err
