"""The training-time estimate's rate: a measured matmul probe, cached per machine
under OPENFT_HOME, overridable by OPENFT_ESTIMATE_FLOPS."""

import json
import math

import pytest
import torch

from openft.autoprecision import resolve_precision
from openft.data.types import Example, Message
from openft.train import throughput
from openft.train.hparams import estimate_seconds
from openft.train.stats import token_stats

CPU = torch.device("cpu")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENFT_HOME", str(tmp_path))
    monkeypatch.delenv(throughput.ENV_FLOPS, raising=False)
    return tmp_path


def _key() -> str:
    return throughput.machine_key(CPU, "fp32").text()


def test_probe_measures_a_positive_rate_and_caches_it(home):
    flops = throughput.matmul_flops(CPU, "fp32")
    assert math.isfinite(flops) and flops > 0
    cache = json.loads(throughput.cache_path().read_text())
    assert cache == {_key(): flops}
    key = json.loads(_key())
    assert (
        key["precision"] == "fp32" and key["threads"] == torch.get_num_threads() and key["torch"] == torch.__version__
    )
    # A later call reads the cache instead of probing again: it returns what the file says.
    throughput.cache_path().write_text(json.dumps({_key(): 1.25e11}))
    assert throughput.matmul_flops(CPU, "fp32") == 1.25e11


def test_a_figure_cached_for_another_machine_is_not_used(home):
    other = throughput.MachineKey("Some Other CPU", torch.__version__, torch.get_num_threads(), "fp32").text()
    throughput.cache_path().write_text(json.dumps({other: 1.0}))
    flops = throughput.matmul_flops(CPU, "fp32")
    assert flops != 1.0
    assert json.loads(throughput.cache_path().read_text()) == {other: 1.0, _key(): flops}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": -5}', '{"KEY": "fast"}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(home, content):
    throughput.cache_path().write_text(content.replace('"KEY"', json.dumps(_key())))
    flops = throughput.matmul_flops(CPU, "fp32")
    assert math.isfinite(flops) and flops > 0
    assert json.loads(throughput.cache_path().read_text())[_key()] == flops


def test_the_effective_rate_is_the_probe_at_the_training_precision_times_its_efficiency(home):
    device = throughput.training_device()
    precision = resolve_precision("auto", device)
    key = throughput.machine_key(device, precision).text()
    throughput.cache_path().write_text(json.dumps({key: 2e11}))
    assert throughput.effective_flops() == 2e11 * throughput.TRAINING_EFFICIENCY[precision]


def test_the_estimate_scales_with_the_rate(home, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv(throughput.ENV_FLOPS, "1e11")
    slow = estimate_seconds(135_000_000, 10_000, 3, "lora")
    assert slow == pytest.approx(10_000 * 3 * 4 * 135_000_000 / 1e11)
    examples = [
        Example(messages=[Message("user", f"question {i}"), Message("assistant", "an answer")]) for i in range(8)
    ]
    stats_slow, _ = token_stats(tiny_tokenizer, examples, max_seq_length=None, n_params=135_000_000)
    monkeypatch.setenv(throughput.ENV_FLOPS, "4e11")
    assert estimate_seconds(135_000_000, 10_000, 3, "lora") == pytest.approx(slow / 4)
    stats_fast, _ = token_stats(tiny_tokenizer, examples, max_seq_length=None, n_params=135_000_000)
    assert stats_fast.estimated_seconds == pytest.approx(stats_slow.estimated_seconds / 4)
    assert not throughput.cache_path().exists()  # the override never probes


@pytest.mark.parametrize("value", ["fast", "0", "-1e9", "inf", "nan"])
def test_a_bad_override_is_refused_naming_the_variable(home, monkeypatch, value):
    monkeypatch.setenv(throughput.ENV_FLOPS, value)
    with pytest.raises(ValueError, match=throughput.ENV_FLOPS):
        estimate_seconds(1000, 10, 1, "lora")
