"""Retake the console screenshots in docs/screenshots/ on the built-in model.

Starts `openft serve` on loopback in a fresh OPENFT_HOME (sharing the converted
built-in model of $OPENFT_HOME when there is one, so it is not converted again),
uploads the example dataset and the first questions of the example question
set through the API, runs a short real job on smollm2-135m-instruct (LoRA,
`--max-steps` optimizer steps, with the before/after comparison), then opens
the console in headless Chromium and saves the five pages README points to:

    .venv/bin/python scripts/screenshots.py              # writes docs/screenshots/*.png
    .venv/bin/python scripts/screenshots.py --out /tmp/shots --max-steps 8

Needs Chromium at /usr/bin/chromium (`apt-get install chromium
fonts-wqy-microhei`) and playwright (a dev dependency). On a 2-core CPU it
takes a few minutes, most of them answering the questions before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "src" / "openft" / "examples"
BUILTIN = "smollm2-135m-instruct"
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
PROMPT = "Who makes the Lumen Glow?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(home / "server.log", "ab")
    env = {**os.environ, "OPENFT_HOME": str(home), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "openft.cli", "serve", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"openft serve exited; see {home / 'server.log'}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("openft serve did not answer /health in 180 s")


def upload(url: str, path: Path, purpose: str, lines: int | None = None) -> str:
    data = path.read_bytes()
    if lines is not None:
        data = b"".join(data.splitlines(keepends=True)[:lines])
    r = httpx.post(url + "/v1/files", files={"file": (path.name, data)}, data={"purpose": purpose}, timeout=120)
    r.raise_for_status()
    return r.json()["id"]


def run_job(url: str, train: str, questions: str, max_steps: int) -> dict:
    body = {
        "model": BUILTIN,
        "training_file": train,
        "suffix": "pip",
        "questions_file": questions,
        "max_steps": max_steps,
    }
    job = httpx.post(url + "/v1/fine_tuning/jobs", json=body, timeout=60).json()
    print(f"job {job['id']} on {BUILTIN}, {max_steps} steps", flush=True)
    deadline = time.time() + 3600
    while time.time() < deadline:
        job = httpx.get(f"{url}/v1/fine_tuning/jobs/{job['id']}", timeout=60).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(3)
    if job["status"] != "succeeded":
        raise SystemExit(f"the job ended {job['status']}: {json.dumps(job.get('error'))}")
    return job


def shoot(page, out: Path, name: str) -> None:
    page.evaluate("window.scrollTo(0, 0)")  # the header is sticky
    page.screenshot(path=str(out / f"{name}.png"), full_page=False)
    print(f"  {out / (name + '.png')}", flush=True)


def take(url: str, out: Path, train: str, job: dict, ckpt: str) -> None:
    from playwright.sync_api import sync_playwright

    model = job["fine_tuned_model"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
        page = context.new_page()
        page.set_default_timeout(600_000)

        page.goto(f"{url}/#/datasets/{train}")
        page.wait_for_selector(".verdict.good")
        page.fill("input[name=model]", BUILTIN)
        page.click("form.inline button[type=submit]")
        page.wait_for_selector(".bar-chart rect.bar", state="attached")
        page.wait_for_selector("pre.tokens mark.trained")
        shoot(page, out, "dataset-stats-preview")

        page.goto(f"{url}/#/jobs/{job['id']}")
        page.wait_for_selector(".badge.status-succeeded")
        page.wait_for_selector("svg.loss-chart path.train")
        page.wait_for_selector("text=:ckpt-step-")
        shoot(page, out, "job-succeeded")

        page.goto(f"{url}/#/compare/{job['id']}")
        page.wait_for_selector("article.qa")
        shoot(page, out, "compare-job")

        page.goto(f"{url}/#/playground?model={model}&model2={ckpt}")
        page.wait_for_selector("form.composer")
        page.fill("textarea[name=system]", "You are Pip.")
        page.fill("input[name=temperature]", "0")
        page.fill("input[name=max_tokens]", "32")
        page.fill("textarea[name=prompt]", PROMPT)
        page.click("form.composer button[type=submit]")
        page.wait_for_selector("[data-pane=A] .msg.assistant.done")
        page.wait_for_selector("[data-pane=B] .msg.assistant.done")
        page.click("button:has-text('Copy as code')")
        page.wait_for_selector("pre.code")
        shoot(page, out, "playground")
        context.close()

        mobile = browser.new_context(viewport={"width": 375, "height": 780}, device_scale_factor=1, is_mobile=True)
        page = mobile.new_page()
        page.set_default_timeout(600_000)
        page.goto(f"{url}/#/compare/{job['id']}")
        page.wait_for_selector("#page article.qa")
        shoot(page, out, "mobile-compare")
        mobile.close()
        browser.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots", help="where the PNGs go")
    ap.add_argument("--max-steps", type=int, default=16, help="optimizer steps of the job")
    ap.add_argument("--questions", type=int, default=4, help="questions of the example set asked before and after")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"no chromium at {CHROMIUM} (apt-get install chromium fonts-wqy-microhei)")
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="openft-shots-"))
    shared = Path(os.environ.get("OPENFT_HOME", Path.home() / ".openft")) / "models"
    if shared.is_dir():
        (home / "models").symlink_to(shared, target_is_directory=True)  # the converted built-in model
    proc, url = start_server(home)
    try:
        train = upload(url, EXAMPLES / "lumen_train.jsonl", "fine-tune")
        questions = upload(url, EXAMPLES / "lumen_questions.jsonl", "evals", lines=args.questions)
        job = run_job(url, train, questions, args.max_steps)
        ckpts = httpx.get(f"{url}/v1/fine_tuning/jobs/{job['id']}/checkpoints", timeout=60).json()["data"]
        take(url, args.out, train, job, ckpts[0]["fine_tuned_model_checkpoint"])
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"OPENFT_HOME of this run (its server log, the run folder): {home}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
