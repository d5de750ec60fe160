"""`--precision auto` is measured: both precisions timed once per machine, the
decision cached under OPENFT_HOME by machine key, forced choices never measure,
and training and serving follow the same decision. No assertion on timings."""

from __future__ import annotations

import json

import pytest
import torch

from openft import autoprecision as ap
from openft.serve.engine import Engine
from openft.train.hparams import resolve_train

CPU = torch.device("cpu")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENFT_HOME", str(tmp_path))
    monkeypatch.delenv(ap.ENV, raising=False)
    monkeypatch.setattr(ap, "_MEASURED", {})  # this process' memo: each test measures afresh
    return tmp_path


def _key() -> str:
    return ap.machine_key(CPU).text()


def _cache() -> dict:
    return json.loads(ap.cache_path().read_text())


def _write(entries: dict) -> None:
    ap.cache_path().write_text(json.dumps(entries))


def _entry(precision: str, fp32: float = 1e11, bf16: float = 3e11, rows: int = ap.ROWS) -> dict:
    return {"precision": precision, "fp32_flops": fp32, "bf16_flops": bf16, "bf16_rows": rows}


def test_the_measured_decision_is_cached_and_reused(home):
    first = ap.decide("auto", CPU)
    assert first.source == "measured" and first.precision in ("fp32", "bf16")
    assert first.fp32_flops > 0 and first.bf16_flops > 0 and first.bf16_rows in ap.CPU_BF16_STEPS
    assert _cache() == {_key(): _entry(first.precision, first.fp32_flops, first.bf16_flops, first.bf16_rows)}
    key = json.loads(_key())
    assert key == {"device": ap.device_name(CPU), "device_type": "cpu", "torch": torch.__version__} | {
        "threads": torch.get_num_threads()
    }
    again = ap.decide("auto", CPU)
    assert again.source == "cached" and again.precision == first.precision and again.fp32_flops == first.fp32_flops
    # Later decisions read the file, not a new measurement: they return what it says.
    flipped = "fp32" if first.precision == "bf16" else "bf16"
    _write({_key(): _entry(flipped, 2e11, 5e11)})
    d = ap.decide("auto", CPU)
    assert (d.precision, d.source, d.fp32_flops, d.bf16_flops) == (flipped, "cached", 2e11, 5e11)


def test_another_process_in_a_new_home_reuses_the_measurement(home, tmp_path, monkeypatch):
    first = ap.decide("auto", CPU)
    monkeypatch.setenv("OPENFT_HOME", str(tmp_path / "other-home"))
    (tmp_path / "other-home").mkdir()
    d = ap.decide("auto", CPU)
    assert d.source == "cached" and d.fp32_flops == first.fp32_flops
    assert _cache()[_key()]["fp32_flops"] == first.fp32_flops  # written into the new home too


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_a_forced_precision_never_measures(home, monkeypatch, requested):
    monkeypatch.setattr(ap, "measure", lambda device: pytest.fail("measured a forced precision"))
    d = ap.decide(requested, CPU)
    assert (d.precision, d.source, d.forced_by) == (requested, "forced", "--precision")
    monkeypatch.setenv(ap.ENV, requested)
    d = ap.decide("auto", CPU)
    assert (d.precision, d.source, d.forced_by) == (requested, "forced", ap.ENV)
    assert "forced by" in d.describe()
    assert not ap.cache_path().exists()


def test_the_flag_beats_the_environment_and_a_bad_value_is_refused(home, monkeypatch):
    monkeypatch.setenv(ap.ENV, "bf16")
    assert ap.resolve_precision("fp32", CPU) == "fp32"
    monkeypatch.setenv(ap.ENV, "fp16")
    with pytest.raises(ValueError, match=f"{ap.ENV} must be one of auto, fp32, bf16"):
        ap.decide("auto", CPU)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, not 'int8'"):
        ap.decide("int8", CPU)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"KEY": "bf16"}',
        '{"KEY": {"precision": "fp16", "fp32_flops": 1, "bf16_flops": 2, "bf16_rows": 512}}',
        '{"KEY": {"precision": "bf16", "fp32_flops": -1, "bf16_flops": 2, "bf16_rows": 512}}',
        '{"KEY": {"precision": "bf16", "fp32_flops": 1, "bf16_flops": 2}}',
        '{"KEY": {"precision": "bf16", "fp32_flops": 1, "bf16_flops": 2, "bf16_rows": true}}',
    ],
)
def test_a_corrupt_cache_is_measured_again_and_rewritten(home, content):
    ap.cache_path().write_text(content.replace('"KEY"', json.dumps(_key())))
    d = ap.decide("auto", CPU)
    assert d.source == "measured" and d.fp32_flops > 0
    assert _cache()[_key()] == _entry(d.precision, d.fp32_flops, d.bf16_flops, d.bf16_rows)


def test_the_key_changes_with_the_torch_version_and_the_cpu_model(home, monkeypatch):
    here = _key()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    newer_torch = _key()
    monkeypatch.setattr(ap, "device_name", lambda device: "Some Other CPU")
    other_cpu = _key()
    assert len({here, newer_torch, other_cpu}) == 3
    # A decision cached under another key is not used, and stays beside the new one.
    _write({here: _entry("bf16")})
    d = ap.decide("auto", CPU)
    assert d.source == "measured" and set(_cache()) == {here, other_cpu}


@pytest.mark.parametrize(
    ("fp32", "bf16", "rows", "expected"),
    [
        (1e11, 1.3e11, ap.ROWS, "bf16"),  # >= 1.2x: bf16
        (1e11, 1.1e11, ap.ROWS, "fp32"),  # faster, but under the margin bf16's accuracy costs
        (1e11, 0.1e11, 32, "fp32"),  # stopped early: far behind
        (1e11, 9e11, 128, "fp32"),  # never timed at full size: not trusted
    ],
)
def test_the_rule_picks_bf16_only_at_the_margin(home, monkeypatch, fp32, bf16, rows, expected):
    monkeypatch.setattr(ap, "measure", lambda device: (fp32, bf16, rows))
    d = ap.decide("auto", CPU)
    assert d.precision == expected and f"{bf16 / fp32:.2f}x" in d.describe()


def test_bf16_stops_early_where_it_is_far_behind(home, monkeypatch):
    """The staircase: a bf16 rate under 1/FAR_BEHIND of fp32's at a small product ends the measurement."""
    rates = iter([1e11, 1e9])  # fp32 at full size, then bf16 at the first step
    monkeypatch.setattr(ap, "best_rate", lambda product, flops, sync: next(rates))
    assert ap.measure(CPU) == (1e11, 1e9, ap.CPU_BF16_STEPS[0])


def test_a_device_without_bf16_kernels_gets_fp32_and_keeps_it(home, monkeypatch):
    calls = []

    def best_rate(product, flops, sync):
        calls.append(flops)
        if len(calls) > 1:
            raise RuntimeError("bf16 not supported")
        return 1e11

    monkeypatch.setattr(ap, "best_rate", best_rate)
    d = ap.decide("auto", CPU)
    assert (d.precision, d.bf16_flops, d.bf16_rows) == ("fp32", 0.0, 0)
    monkeypatch.setattr(ap, "_MEASURED", {})
    assert (
        ap.decide("auto", CPU).source == "cached" and len(calls) == 2
    )  # the file's entry is valid: not measured again


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_and_serving_follow_the_cached_decision(home, precision):
    _write({_key(): _entry(precision)})
    from openft.config import TrainConfig

    assert resolve_train(TrainConfig(), 8, 64, CPU).precision == precision
    eng = Engine(device="cpu")
    assert eng.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    assert eng.precision.source == "cached"
    forced = Engine(device="cpu", dtype=torch.float32)
    assert forced.dtype == torch.float32 and forced.precision.source == "forced"
