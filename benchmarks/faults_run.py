"""The SIGKILL campaign, as a report: faults injected and survived.

Starts a real `openft serve --no-worker` on loopback in a fresh OPENFT_HOME, runs
one uninterrupted reference job (tiny model, 24 steps, a checkpoint and an
evaluation every 3), then creates the same job again and again while killing the
workers that train it (SIGKILL at a fault point picked by a seeded RNG with a
random hit count, or from outside after a random delay) until `--kills` deaths
have landed inside jobs. Every job is then checked against the reference: it
succeeded, its metrics steps only go forward (none twice, none missing, the same
losses), its checkpoint events, folders and store rows match, and its final
adapter equals the reference's. A job survived a fault if all of that holds.

    .venv/bin/python benchmarks/faults_run.py --kills 20
    .venv/bin/python benchmarks/faults_run.py --kills 50 --seed 7 --json

The same campaign runs in the test suite (tests/faults/test_kill_campaign.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from faults.campaign import Campaign, Zygote  # noqa: E402
from serve.conftest import TINY, Server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs to land inside jobs (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the RNG that picks fault points and delays")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args()

    models = Path(os.environ.get("OPENFT_HOME") or Path.home() / ".openft") / "models"
    with tempfile.TemporaryDirectory(prefix="openft-faults-") as tmp:
        tmp = Path(tmp)
        os.environ["OPENFT_HOME"] = str(tmp / "build")  # where the tiny model's tokenizer gets cached
        if models.exists():
            (tmp / "build").mkdir()
            (tmp / "build" / "models").symlink_to(models, target_is_directory=True)
        from openft.models.tiny import build_tiny_model

        model = build_tiny_model(tmp / "tiny-model")
        home = tmp / "home"
        home.mkdir()
        if models.exists():
            (home / "models").symlink_to(models, target_is_directory=True)
        t0 = time.monotonic()
        server = Server(home, "--no-worker", models={TINY: model}).start()
        zygote = Zygote()
        try:
            campaign = Campaign(server, zygote, TINY, seed=args.seed, log=lambda m: print(m, flush=True))
            print("reference run ...", flush=True)
            campaign.run_reference()
            print(f"killing workers until {args.kills} SIGKILLs have landed inside jobs ...", flush=True)
            campaign.run(args.kills)
            survived, failed, resumes, diffs = 0, [], 0, []
            for rec in campaign.jobs:
                try:
                    figures = campaign.check(rec.id)
                except AssertionError as e:
                    failed.append((rec.id, str(e)[:300]))
                    continue
                survived += len(rec.kills)
                resumes += figures["resumes"]
                diffs.append(figures["max_weight_diff"])
            summary = campaign.summary()
            summary.update(
                {
                    "faults_survived": survived,
                    "jobs_succeeded_as_reference": len(campaign.jobs) - len(failed),
                    "resumed_from_checkpoint": resumes,
                    "max_adapter_weight_diff": max(diffs) if diffs else None,
                    "seed": args.seed,
                    "wall_s": round(time.monotonic() - t0, 1),
                    "failures": failed,
                }
            )
        finally:
            zygote.close()
            server.stop()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\nfaults injected: {summary['faults_injected']}   survived: {summary['faults_survived']}")
        print("by moment: " + ", ".join(f"{k} {v}" for k, v in sorted(Counter(summary["by_point"]).items())))
        print(
            f"jobs: {summary['jobs']} (all as the uninterrupted run: {summary['jobs_succeeded_as_reference']}), "
            f"worker processes started: {summary['worker_starts']}, resumes from a checkpoint: "
            f"{summary['resumed_from_checkpoint']}, largest adapter weight difference: "
            f"{summary['max_adapter_weight_diff']}"
        )
        print(f"wall time: {summary['wall_s']} s (seed {args.seed})")
        for jid, why in summary["failures"]:
            print(f"FAILED {jid}: {why}")
    return 0 if not summary["failures"] and summary["faults_survived"] == summary["faults_injected"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
