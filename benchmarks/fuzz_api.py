"""A larger schemathesis campaign against a real `openft serve` on loopback.

Starts a server in a fresh OPENFT_HOME (sharing the converted built-in model),
creates an API key, trains a one-step job on a tiny model so real ids exist,
then generates `--examples` requests per operation and mode (valid and invalid
data) plus a pass over the real objects, checking every answer: no 5xx, a
declared status, a body matching the declared schema. The campaign's size is
the example count (no clock): every operation gets its examples.

    .venv/bin/python benchmarks/fuzz_api.py --examples 200
    .venv/bin/python benchmarks/fuzz_api.py --examples 2 --json   # a quick check, one JSON object

Prints the request count, statuses and failures; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from figures import Report, add_json_flag  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=150, help="generated requests per operation and mode")
    ap.add_argument("--seed", type=int, default=0)
    add_json_flag(ap)
    args = ap.parse_args()
    out = Report(args.json, benchmark="fuzz_api", examples=args.examples, seed=args.seed)

    from openft.models.tiny import build_tiny_model
    from tests.serve.conftest import TINY, Server
    from tests.serve.test_api_fuzz import create_key, fuzz, real_objects

    shared = Path(os.environ.get("OPENFT_HOME", ROOT / ".openft-home"))
    work = Path(tempfile.mkdtemp(prefix="openft-fuzz-"))
    home = work / "home"
    home.mkdir()
    (home / "models").symlink_to(shared / "models", target_is_directory=True)  # the converted built-in model
    tiny = build_tiny_model(work / "tiny")
    key = create_key(home, "fuzzer")
    server = Server(home, "--max-upload-mb", "1", models={TINY: tiny}).start()
    try:
        ids = real_objects(server, key, TINY)
        t0 = time.monotonic()
        report = fuzz(server.url, key, examples=args.examples, seed=args.seed, real_ids=ids)
        took = time.monotonic() - t0
        alive = server.health()["status"] == "ok"
    finally:
        server.stop()
    out.figures.update(
        requests=report.requests,
        seconds=took,
        statuses={str(k): v for k, v in sorted(report.statuses.items())},
        by_operation=dict(sorted(report.by_operation.items())),
        failures=report.failures,
        server_alive=alive,
    )
    out.line(f"requests: {report.requests} in {took:.0f} s over {len(report.by_operation)} operations")
    out.line(f"statuses: {dict(sorted(report.statuses.items()))}")
    for op, n in sorted(report.by_operation.items()):
        out.line(f"  {n:6d}  {op}")
    out.line(f"failures: {len(report.failures)}; server alive afterwards: {alive}")
    for f in report.failures[:20]:
        out.line("-" * 72 + "\n" + f)
    out.emit()
    return 1 if report.failures or not alive else 0


if __name__ == "__main__":
    raise SystemExit(main())
