"""A CPU run capped to fewer instructions (openft.hardware.isa_env): how the
benchmarks measure an AVX2-only or AVX512-BF16-only machine on one that has more."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from openft.hardware import CPU_ISAS, cpu_flags, isa_cap, isa_env

PROBE = (
    "import json, torch; from openft.hardware import device_name, isa_cap; "
    "print(json.dumps([torch.backends.cpu.get_cpu_capability(), device_name(torch.device('cpu')), isa_cap()]))"
)


def probe(env: dict[str, str]) -> tuple[str, str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout))


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="this CPU has no more than AVX2 to cap")
def test_a_process_capped_to_avx2_runs_avx2_kernels_and_is_another_machine_to_the_caches():
    import os

    native = probe(isa_env("native", os.environ))
    capped = probe(isa_env("avx2", os.environ))
    assert native[0].startswith("AVX512") and capped[0] == "AVX2"
    assert native[1] != capped[1] and "capped" in capped[1] and native[2] == ""
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in capped[2]


def test_native_lifts_a_cap_and_an_unknown_set_is_refused():
    capped = isa_env("avx2", {"PATH": "/bin"})
    assert capped["ONEDNN_MAX_CPU_ISA"] == "AVX2" and capped["PATH"] == "/bin"
    assert isa_env("native", capped) == {"PATH": "/bin"}
    assert isa_cap(isa_env("avx512_bf16", {})) == "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16"
    with pytest.raises(ValueError, match="avx2"):
        isa_env("sse2", {})
    assert CPU_ISAS[0] == "native"


def test_the_capped_product_is_what_auto_measures(monkeypatch):
    # The cap reaches the precision cache key through device_name.
    from openft import autoprecision as ap

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    key = ap.machine_key(torch.device("cpu"))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert key != ap.machine_key(torch.device("cpu"))
