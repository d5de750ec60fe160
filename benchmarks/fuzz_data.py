"""A larger fuzz campaign against the dataset readers and layouts.

Runs the property tests of tests/data/test_data_fuzz.py with many more random
(not derandomised) hypothesis examples each, then prints how many cases ran per
reader, layout and outcome (a valid dataset, or clean errors). Every case must
end one of those two ways; any other outcome fails the run and is printed by
pytest with the input that caused it.

    .venv/bin/python benchmarks/fuzz_data.py --examples 5000
    .venv/bin/python benchmarks/fuzz_data.py --examples 2000 --seed 7 --all
    .venv/bin/python benchmarks/fuzz_data.py --atheris 120   # + coverage-guided bytes
    .venv/bin/python benchmarks/fuzz_data.py --examples 20 --json   # a quick check, one JSON object

`--atheris SECONDS` additionally runs atheris (libFuzzer driving
`load_dataset` with raw bytes, guided by coverage of openft.data's Python code)
for that long per reader, when atheris is importable (`pip install atheris`;
it is not a project dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from figures import Report, add_json_flag  # noqa: E402

TESTS = ROOT / "tests" / "data" / "test_data_fuzz.py"
PROPERTY_TESTS = ("round_trip", "encodings", "damaged", "random_bytes", "odd_records", "any_json")
READERS = ("json", "jsonl", "csv", "tsv", "xml", "parquet")


def run_hypothesis(examples: int, seed: int | None, everything: bool, report: Path, out) -> int:
    env = {**os.environ, "OPENFT_FUZZ_EXAMPLES": str(examples), "OPENFT_FUZZ_REPORT": str(report)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS)]
    if not everything:  # only the hypothesis-driven tests scale with --examples
        cmd += ["-k", " or ".join(PROPERTY_TESTS)]
    if seed is not None:
        cmd.append(f"--hypothesis-seed={seed}")
    print("$", " ".join(cmd), f"(OPENFT_FUZZ_EXAMPLES={examples})", file=out, flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=out).returncode


def print_table(rows: list[dict], report: Report) -> None:
    table: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in rows:
        table[(r["reader"], r["layout"])][r["outcome"]] += r["cases"]
    report.line(f"\n{'reader':8} {'layout':18} {'valid':>8} {'clean error':>12} {'total':>8}")
    totals: Counter = Counter()
    cases = report.add("cases", {})  # reader -> layout -> {"valid": n, "error": n}
    for (reader, layout), c in sorted(table.items()):
        cases.setdefault(reader, {})[layout] = {"valid": c["valid"], "error": c["error"]}
        report.line(f"{reader:8} {layout:18} {c['valid']:8} {c['error']:12} {c['valid'] + c['error']:8}")
        totals.update(c)
    per_reader: Counter = Counter()
    for (reader, _), c in table.items():
        per_reader[reader] += c["valid"] + c["error"]
    report.line(f"{'all':8} {'':18} {totals['valid']:8} {totals['error']:12} {totals['valid'] + totals['error']:8}")
    report.line("per reader: " + ", ".join(f"{r} {n}" for r, n in sorted(per_reader.items())))


# --------------------------------------------------------------------------- atheris

ATHERIS_HARNESS = r"""
import os, sys, tempfile
import atheris
with atheris.instrument_imports(include=["openft.data"]):
    from openft.data.load import load_dataset
from openft.data.types import Problem

READER = sys.argv[1]
DIR = tempfile.mkdtemp()
PATH = os.path.join(DIR, "case." + READER)

def one(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    result = load_dataset(PATH)  # any exception is a finding
    if not result.ok:
        assert result.errors and all(isinstance(p, Problem) and p.file for p in result.errors)
        for p in result.errors:
            str(p).encode("utf-8")

atheris.Setup([sys.argv[0], *sys.argv[2:]], one)
atheris.Fuzz()
"""


def run_atheris(seconds: int, readers: list[str], out) -> dict[str, int | str]:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return {"skipped": "atheris is not installed (pip install atheris)"}
    runs: dict[str, int | str] = {}
    artifacts = Path(tempfile.gettempdir()) / "openft-fuzz-artifacts"  # kept: the inputs that failed
    artifacts.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        harness = Path(d) / "harness.py"
        harness.write_text(ATHERIS_HARNESS)
        for reader in readers:
            corpus = Path(d) / f"corpus-{reader}"
            corpus.mkdir()
            _seed_corpus(corpus, reader)
            proc = subprocess.run(
                [
                    sys.executable,
                    str(harness),
                    reader,
                    str(corpus),
                    f"-max_total_time={seconds}",
                    "-rss_limit_mb=4096",
                    "-timeout=30",
                    f"-artifact_prefix={artifacts}/{reader}-",
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            done = re.findall(r"Done (\d+) runs", proc.stderr)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=out)
                runs[reader] = f"FINDING (exit {proc.returncode})"
            else:
                runs[reader] = int(done[-1]) if done else 0
    return runs


def _seed_corpus(corpus: Path, reader: str) -> None:
    """A few valid files to start from, so mutations reach the layouts."""
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    seeds = {
        "json": [json.dumps([chat, {"question": "q", "answer": "a"}]), json.dumps({"data": [chat]})],
        "jsonl": [json.dumps(chat) + "\n" + json.dumps({"instruction": "i", "output": "o"}) + "\n"],
        "csv": ['question,answer\n"multi\nline",a\n', 'messages\n"[{""role"": ""user"", ""content"": ""x""}]"\n'],
        "tsv": ["prompt\tcompletion\np\tc\n"],
        "xml": [
            "<r><i><question>q</question><answer>a</answer></i></r>",
            '<c><chat><messages><message role="user">h</message>'
            '<message role="assistant">y</message></messages></chat></c>',
        ],
    }
    if reader == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([chat, chat]), corpus / "seed0")
        pq.write_table(pa.table({"text": ["a", "b"]}), corpus / "seed1")
        return
    for i, s in enumerate(seeds[reader]):
        (corpus / f"seed{i}").write_text(s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=5000, help="hypothesis examples per property test")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    ap.add_argument("--all", action="store_true", help="also run the fixed hostile-file cases")
    ap.add_argument(
        "--atheris",
        type=int,
        default=0,
        metavar="SECONDS",
        help="also fuzz raw bytes with atheris for SECONDS per reader",
    )
    ap.add_argument("--readers", default=",".join(READERS), help="readers atheris fuzzes")
    ap.add_argument("--atheris-only", action="store_true", help="skip the hypothesis campaign")
    add_json_flag(ap)
    args = ap.parse_args()
    report = Report(args.json, benchmark="fuzz_data", examples=args.examples, seed=args.seed)
    rc = 0
    if args.atheris_only:
        rc = atheris_campaign(args.atheris or 60, args.readers.split(","), report)
        report.emit()
        return rc

    with tempfile.TemporaryDirectory() as d:
        counts = Path(d) / "counts.json"
        start = time.monotonic()
        rc = run_hypothesis(args.examples, args.seed, args.all, counts, report.out)
        elapsed = time.monotonic() - start
        rows = json.loads(counts.read_text()) if counts.exists() else []
    print_table(rows, report)
    total = sum(r["cases"] for r in rows)
    report.figures.update(total_cases=total, seconds=elapsed, pytest_exit=rc)
    report.line(
        f"hypothesis: {total} cases in {elapsed:.0f} s; pytest exit {rc} "
        f"({'every case a valid dataset or clean errors' if rc == 0 else 'FAILURES above'})"
    )
    if args.atheris:
        rc = atheris_campaign(args.atheris, args.readers.split(","), report) or rc
    report.emit()
    return rc


def atheris_campaign(seconds: int, readers: list[str], report: Report) -> int:
    """Runs atheris per reader; 1 if it found anything, else 0."""
    runs = report.add("atheris", run_atheris(seconds, readers, report.out))
    report.line(f"atheris ({seconds} s per reader): {runs}")
    return int(any(isinstance(v, str) and v.startswith("FINDING") for v in runs.values()))


if __name__ == "__main__":
    raise SystemExit(main())
