"""The web console in a real headless chromium against a real `openft serve`:
upload a bad and a good dataset, start a job on the tiny model, watch it live to
`succeeded`, open the comparison, chat with the fine-tuned model (streaming).

Screenshots go to artifacts/console/*.png (those in docs/screenshots/ show the
built-in model and come from scripts/screenshots.py, not from this tiny model). The time from a metrics event reaching the store to
the job page showing it is measured and printed (never asserted on as a timing).
"""

from __future__ import annotations

import json
import re
import sqlite3
import statistics
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from serve.conftest import TINY

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "src" / "openft" / "console" / "static"
EXAMPLES = REPO / "src" / "openft" / "examples"
DOCS_SHOTS = REPO / "docs" / "screenshots"

# Records when each job event appears in the DOM (Date.now(), ms since the epoch:
# the same clock as the test's time.time() on this machine).
SEEN_SCRIPT = """
window.__seen = {};
new MutationObserver((records) => {
  const now = Date.now();
  for (const r of records) for (const n of r.addedNodes) {
    if (n.nodeType !== 1) continue;
    const els = n.matches('[data-event-id]') ? [n] : [...n.querySelectorAll('[data-event-id]')];
    for (const el of els) if (!(el.dataset.eventId in window.__seen)) window.__seen[el.dataset.eventId] = now;
  }
}).observe(document, {childList: true, subtree: true});
"""


def _lines(n: int) -> list[str]:
    return (EXAMPLES / "lumen_train.jsonl").read_text(encoding="utf-8").splitlines()[:n]


def _good_dataset() -> bytes:
    rows = _lines(60)
    # Chinese rows too: the console must show them as written.
    rows += [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "你好，你是谁？"},
                    {"role": "assistant", "content": "我是 Pip，Lumen 台灯的客服助手。"},
                ]
            },
            ensure_ascii=False,
        )
    ] * 4
    return ("\n".join(rows) + "\n").encode()


def _bad_dataset() -> bytes:
    rows = _lines(12)
    rows[2] = '{"messages": [{"role": "user"'  # truncated JSON on line 3
    return ("\n".join(rows) + "\n").encode()


QUESTIONS = (
    "\n".join(
        json.dumps(q, ensure_ascii=False)
        for q in [
            {
                "question": "Who makes the Lumen Glow?",
                "reference": "Pip here! The Lumen Glow is made by Lumen Lamps in Oslo.",
            },
            {"question": "你好，你是谁？", "reference": "我是 Pip，Lumen 台灯的客服助手。"},
        ]
    )
    + "\n"
).encode()


class StoreWatcher(threading.Thread):
    """Polls the server's SQLite store every 5 ms and notes when each metrics
    event row first appears: the moment the worker has logged it."""

    def __init__(self, db: Path):
        super().__init__(daemon=True)
        self.db, self.first_seen, self.stop = db, {}, threading.Event()

    def run(self):
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        while not self.stop.is_set():
            try:
                for (eid,) in con.execute("SELECT id FROM events WHERE type = 'metrics'"):
                    self.first_seen.setdefault(eid, time.time())
            except sqlite3.Error:
                pass
            time.sleep(0.005)
        con.close()


def shot(page, artifacts: Path, name: str, *, full_page: bool = True) -> Path:
    path = artifacts / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")  # the header is sticky: a scrolled page would show it mid-shot
    page.screenshot(path=str(path), full_page=full_page)
    return path


def upload_via_picker(page, name: str, data: bytes, purpose: str = "fine-tune"):
    page.select_option("select[name=purpose]", purpose)
    page.set_input_files("#file-picker", files=[{"name": name, "mimeType": "application/octet-stream", "buffer": data}])
    page.wait_for_url(re.compile(r"#/datasets/file-"))


def upload_via_drop(page, name: str, data: bytes):
    page.evaluate(
        """([name, text]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: "application/jsonl"}));
        document.querySelector(".dropzone").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    }""",
        [name, data.decode("utf-8")],
    )
    page.wait_for_url(re.compile(r"#/datasets/file-"))


# ---- static assets ---------------------------------------------------------------


def test_console_is_served_and_uses_no_remote_asset(console_server):
    index = httpx.get(console_server.url + "/", timeout=10)
    assert index.status_code == 200 and "text/html" in index.headers["content-type"]
    assert '<script type="module" src="/console/app.js">' in index.text
    js = httpx.get(console_server.url + "/console/app.js", timeout=10)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert httpx.get(console_server.url + "/console/nope.js", timeout=10).status_code == 404
    # The API keeps its own 404 envelope next to the console.
    assert httpx.get(console_server.url + "/v1/nope", timeout=10).json()["error"]["code"] == "not_found"
    for f in STATIC.iterdir():
        text = f.read_text(encoding="utf-8")
        # No CDN, font or script from the internet: every URL is relative to the server.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), f.name
        assert not re.search(r"""(import|from)\s*["'](https?:)?//""", text), f.name
        assert "@import" not in text and "url(http" not in text, f.name


# ---- the whole flow ----------------------------------------------------------------


@pytest.fixture(scope="module")
def flow():
    return {}


def test_datasets_bad_line_then_good_file_with_stats_and_preview(console_server, page, artifacts, tiny_model_dir, flow):
    page.goto(console_server.url + "/#/datasets")
    page.wait_for_selector(".dropzone")
    upload_via_picker(page, "bad.jsonl", _bad_dataset())
    # The validation report names line 3.
    row = page.locator("tr.error").first
    row.wait_for()
    assert row.get_attribute("data-line") == "3" and "bad.jsonl: line 3" in row.locator("td.where").inner_text()
    assert page.locator("tr.error").count() == 1
    assert "Not usable" in page.locator(".verdict").inner_text()
    assert "line 3" in page.locator("#banner").inner_text()
    shot(page, artifacts, "datasets-bad-line")

    page.goto(console_server.url + "/#/datasets")
    page.wait_for_selector(".dropzone")
    upload_via_drop(page, "pip 训练.jsonl", _good_dataset())
    page.wait_for_selector(".verdict.good")
    assert "64 example" in page.locator(".verdict").inner_text()
    flow["train_file"] = page.url.rsplit("/", 1)[-1]
    # Statistics and preview need a tokenizer: the tiny model's (registered by name).
    page.fill("input[name=model]", TINY)
    page.click("form.inline button[type=submit]")
    page.wait_for_selector(".bar-chart rect.bar", state="attached", timeout=120_000)
    assert page.locator(".bar-chart rect.bar").count() == 12
    page.wait_for_selector("pre.tokens mark.trained")
    preview = page.locator("article.example").first
    assert "train" in preview.locator("header").inner_text()  # where: the file and line
    assert page.locator("pre.tokens mark.trained").first.inner_text().strip()
    shot(page, artifacts, "dataset-stats-preview")

    page.goto(console_server.url + "/#/datasets")
    upload_via_picker(page, "questions.jsonl", QUESTIONS, purpose="evals")
    page.locator("pre.content", has_text="你好，你是谁？").wait_for()
    flow["questions_file"] = page.url.rsplit("/", 1)[-1]
    page.goto(console_server.url + "/#/datasets")
    page.wait_for_selector("table")
    assert page.get_by_text("pip 训练.jsonl").count() == 1
    shot(page, artifacts, "datasets")
    assert not page.console_errors, page.console_errors


def test_new_job_live_progress_chart_and_latency(console_server, page, artifacts, tiny_model_dir, flow):
    assert flow.get("train_file"), "needs the uploaded files of the previous test"
    page.add_init_script(SEEN_SCRIPT)
    page.goto(console_server.url + f"/#/new?training_file={flow['train_file']}")
    page.wait_for_selector("form.newjob")
    # Every hyperparameter starts as auto, with its rule beside it.
    assert page.locator("label.hp input").first.get_attribute("placeholder") == "auto"
    assert page.locator("label.hp .help").count() >= 12
    page.fill("input[name=model]", TINY)
    page.fill("input[name=n_epochs]", "8")
    page.fill("input[name=batch_size]", "4")
    page.fill("input[name=learning_rate]", "0.01")
    page.fill("input[name=lora_rank]", "8")
    page.fill("input[name=validation_split]", "0.15")
    page.select_option("select[name=questions_file]", flow["questions_file"])
    page.fill("input[name=suffix]", "pip")
    page.wait_for_selector(".estimate-line", timeout=60_000)
    estimate = page.locator(".estimate-line").inner_text()
    assert "8 epoch" in estimate and "steps of 4" in estimate, estimate
    shot(page, artifacts, "new-job")

    watcher = StoreWatcher(console_server.home / "openft.db")
    watcher.start()
    page.click("form.newjob button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[-1]
    flow["job"] = job_id
    # Live: the chart gains points while the job runs.
    page.wait_for_function(
        "Number(document.querySelector('svg.loss-chart path.train')?.dataset.points || 0) >= 3", timeout=120_000
    )
    running_points = int(page.locator("svg.loss-chart path.train").get_attribute("data-points"))
    assert "step" in page.locator(".progress-line").inner_text()
    shot(page, artifacts, "job-running")
    page.wait_for_selector(".badge.status-succeeded, .badge.status-failed", timeout=300_000)
    watcher.stop.set()
    watcher.join()
    assert page.locator("h1 .badge").inner_text() == "succeeded", page.locator(".error-box").all_inner_texts()
    final_points = int(page.locator("svg.loss-chart path.train").get_attribute("data-points"))
    assert final_points > running_points  # it updated while running
    d = page.locator("svg.loss-chart path.train").get_attribute("d")
    assert d.startswith("M") and d.count("L") == final_points - 1
    assert int(page.locator("svg.loss-chart path.valid").get_attribute("data-points")) >= 1
    assert page.locator("svg.loss-chart .valid-dots circle").count() >= 1
    page.wait_for_selector("text=:ckpt-step-")
    assert re.match(r"step (\d+) of \1 · 100%", page.locator(".progress-line").inner_text())
    flow["model"] = httpx.get(f"{console_server.url}/v1/fine_tuning/jobs/{job_id}", timeout=10).json()[
        "fine_tuned_model"
    ]
    assert flow["model"].startswith("ft:") and ":pip:" in flow["model"]
    assert page.get_by_text(flow["model"], exact=True).count() >= 1
    shot(page, artifacts, "job-succeeded")

    # Every metrics event of the job (the only job so far) is on the page, once.
    shown = page.eval_on_selector_all("li.event.type-metrics", "els => els.map(e => e.dataset.eventId)")
    assert sorted(shown) == sorted(watcher.first_seen), (len(shown), len(watcher.first_seen))
    # Event-to-DOM latency: store row first seen -> row added to the page, over the
    # events the page got by polling: those stored after it first drew the job's
    # events (the ones before came with the page itself, not as updates).
    seen_ms = page.evaluate("window.__seen")
    page_live = min(seen_ms.values()) / 1000
    live = {eid: t for eid, t in watcher.first_seen.items() if t > page_live}
    assert live, "no metrics event arrived while the page was open"  # it updated while running (as above)
    assert set(live) <= set(seen_ms), set(live) - set(seen_ms)  # each live event reached the page
    lat = sorted(seen_ms[eid] / 1000 - t for eid, t in live.items())
    flow["latency"] = lat
    print(
        f"\nevent-to-DOM latency over {len(lat)} metrics events: median {statistics.median(lat) * 1000:.0f} ms, "
        f"p90 {lat[int(0.9 * (len(lat) - 1))] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms (1 s polling)"
    )
    assert not page.console_errors, page.console_errors


def test_comparison_and_checkpoint_comparison(console_server, page, artifacts, flow):
    assert flow.get("job")
    page.goto(console_server.url + f"/#/jobs/{flow['job']}")
    page.click("a.button:has-text('Comparison')")
    page.wait_for_selector("article.qa")
    assert page.locator("article.qa").count() == 2
    assert "你好，你是谁？" in page.locator("article.qa h3").nth(1).inner_text()
    assert page.locator(".side.before").count() == 2 and page.locator(".side.after").count() == 2
    assert page.locator(".chip").count() >= 8  # exact, contains, ROUGE-L (+ similarity) per side
    assert page.locator(".verdict").inner_text().strip()
    assert page.locator("ul.checks li").count() >= 1
    shot(page, artifacts, "compare-job")

    # Any checkpoint against the final model, via POST /v1/comparisons.
    ckpts = httpx.get(f"{console_server.url}/v1/fine_tuning/jobs/{flow['job']}/checkpoints", timeout=10).json()["data"]
    ckpt = ckpts[-1]["fine_tuned_model_checkpoint"]
    page.goto(
        console_server.url + f"/#/compare?before={flow['model']}&after={ckpt}&questions_file={flow['questions_file']}"
    )
    page.wait_for_selector("form.compare-form")
    assert page.locator("input[name=after_model]").input_value() == ckpt
    page.click("form.compare-form button[type=submit]")
    page.wait_for_selector(".comparison-out article.qa", timeout=120_000)
    assert page.locator(".comparison-out article.qa").count() == 2
    assert ckpt in page.locator(".comparison-out .side.after code").first.inner_text()
    shot(page, artifacts, "compare-checkpoint")
    assert not page.console_errors, page.console_errors


def test_playground_streams_side_by_side_and_copies_code(console_server, page, artifacts, flow):
    assert flow.get("model")
    ckpt = httpx.get(f"{console_server.url}/v1/fine_tuning/jobs/{flow['job']}/checkpoints", timeout=10).json()["data"][
        0
    ]["fine_tuned_model_checkpoint"]
    page.goto(console_server.url + f"/#/playground?model={flow['model']}&model2={ckpt}")
    page.wait_for_selector("form.composer")
    assert page.locator("input[name=side_by_side]").is_checked()
    page.fill("textarea[name=system]", "You are Pip.")
    page.fill("input[name=temperature]", "0")
    page.fill("input[name=max_tokens]", "24")
    # Count text pieces appended to the answers as they stream in.
    page.evaluate("""() => {
        window.__pieces = {A: 0, B: 0};
        new MutationObserver((rs) => { for (const r of rs) {
            const pane = r.target.closest && r.target.closest('[data-pane]');
            if (pane && r.target.closest('.msg.assistant')) window.__pieces[pane.dataset.pane] += r.addedNodes.length;
        }}).observe(document.querySelector('.panes'), {childList: true, subtree: true});
    }""")
    page.fill("textarea[name=prompt]", "你好，你是谁？")
    page.click("form.composer button[type=submit]")
    page.wait_for_selector("[data-pane=A] .msg.assistant.done")
    page.wait_for_selector("[data-pane=B] .msg.assistant.done")
    for pane in "AB":
        answer = page.locator(f"[data-pane={pane}] .msg.assistant .text").inner_text()
        meta = page.locator(f"[data-pane={pane}] .msg.assistant .meta").inner_text()
        assert answer.strip() and "finish:" in meta and "error" not in meta, (answer, meta)
    pieces = page.evaluate("window.__pieces")
    assert pieces["A"] >= 3 and pieces["B"] >= 3, pieces  # arrived in pieces: streamed, not one block
    assert page.locator("[data-pane=A] .msg.user .text").inner_text() == "你好，你是谁？"
    # The answer matches a non-streamed call through the API with the same settings.
    r = httpx.post(
        f"{console_server.url}/v1/chat/completions",
        timeout=60,
        json={
            "model": flow["model"],
            "temperature": 0,
            "max_tokens": 24,
            "messages": [{"role": "system", "content": "You are Pip."}, {"role": "user", "content": "你好，你是谁？"}],
        },
    ).json()
    assert page.locator("[data-pane=A] .msg.assistant .text").inner_text() == r["choices"][0]["message"]["content"]
    page.click("button:has-text('Copy as code')")
    snippet = page.locator("pre.code").inner_text()
    assert "from openai import OpenAI" in snippet and flow["model"] in snippet and "你好，你是谁？" in snippet
    assert "stream=True" in snippet and "temperature=0" in snippet
    shot(page, artifacts, "playground")
    assert not page.console_errors, page.console_errors


def test_models_lineage_export_clone_and_keys(console_server, page, artifacts, tiny_model_dir, flow):
    assert flow.get("model")
    page.goto(console_server.url + "/#/models")
    row = page.locator(f"tr[data-model='{flow['model']}']")
    row.wait_for()
    row.locator("button:has-text('Details')").click()
    page.wait_for_selector(".model-details")
    details = page.locator(".model-details").inner_text()
    assert "Lineage" in details and "trained tokens" in details
    # Export: the formats and quantisations are the server's own list for this model.
    row.locator("button:has-text('Export…')").click()
    form = page.locator("form.export")
    offered = httpx.get(f"{console_server.url}/v1/models/{flow['model']}", timeout=10).json()["exports"]
    assert form.locator("select[name=format] option").evaluate_all("os => os.map(o => o.value)") == offered["formats"]
    form.locator("select[name=format]").select_option("gguf")
    quants = form.locator("select[name=quant] option").evaluate_all("os => os.map(o => o.value)")
    assert quants == offered["quants"]["gguf"] and "q8_0" in quants
    assert form.locator("select[name=quant]").input_value() == offered["default_quant"]["gguf"]
    form.locator("select[name=quant]").select_option("q8_0")
    with page.expect_download() as dl:
        form.locator("button:has-text('Download')").click()
    assert dl.value.suggested_filename.endswith("-q8_0.gguf"), dl.value.suggested_filename
    assert Path(dl.value.path()).read_bytes()[:4] == b"GGUF"
    page.wait_for_selector("#banner:has-text('Downloaded')")
    # A checkpoint's adapter: a zip with the PEFT files; no quantisation for it.
    form.locator("select[name=source]").select_option(index=1)
    page.wait_for_selector("form.export:not([aria-busy])")  # the checkpoint's own options have arrived
    form.locator("select[name=format]").select_option("adapter")
    assert form.locator("select[name=quant]").is_hidden()
    with page.expect_download() as dl:
        form.locator("button:has-text('Download')").click()
    assert "step" in dl.value.suggested_filename and dl.value.suggested_filename.endswith(".zip")
    assert "adapter_config.json" in zipfile.ZipFile(dl.value.path()).namelist()
    shot(page, artifacts, "models")

    # Clone with changes: New job pre-filled from the job.
    page.goto(console_server.url + f"/#/jobs/{flow['job']}")
    page.click("a:has-text('Clone with changes')")
    page.wait_for_selector("form.newjob")
    assert page.locator("input[name=model]").input_value() == TINY
    assert page.locator("select[name=training_file]").input_value() == flow["train_file"]
    assert page.locator("input[name=n_epochs]").input_value() == "8"
    assert page.locator("select[name=questions_file]").input_value() == flow["questions_file"]

    # A second round: the fine-tuned model is offered as a base model.
    options = page.eval_on_selector_all("datalist option", "els => els.map(e => e.value)")
    assert flow["model"] in options

    # Keys: creating the first key ends local mode; the console adopts it and keeps working.
    page.goto(console_server.url + "/#/models")
    page.click("button:has-text('Create a key')")
    page.wait_for_selector("code.key")
    key = page.locator("code.key").inner_text()
    assert httpx.get(console_server.url + "/v1/models", timeout=10).status_code == 401
    page.reload()
    page.wait_for_selector(f"tr[data-model='{flow['model']}']")
    assert "…" + key[-4:] in page.locator("#key-button").inner_text()
    page.once("dialog", lambda d: d.accept())
    page.locator("button:has-text('Delete')").last.click()
    page.wait_for_selector("text=No API keys")
    assert httpx.get(console_server.url + "/v1/models", timeout=10).status_code == 200
    assert not page.console_errors, page.console_errors


def test_errors_are_shown_with_the_servers_message(console_server, page):
    page.goto(console_server.url + "/#/jobs/ftjob-doesnotexist")
    page.wait_for_selector("#banner.error")
    assert "No such fine-tuning job: ftjob-doesnotexist" in page.locator("#banner").inner_text()
    # The server unreachable: every /v1 and /health call fails at the network level.
    page.route(re.compile(r".*/(v1|health).*"), lambda route: route.abort())
    page.goto(console_server.url + "/#/datasets")
    page.wait_for_selector("#banner.error")
    assert "Cannot reach the openft server" in page.locator("#banner").inner_text()
    page.wait_for_selector(".health.down")


def test_narrow_screen_375px(console_server, browser, artifacts, tiny_model_dir, flow):
    context = browser.new_context(viewport={"width": 375, "height": 780}, device_scale_factor=1, is_mobile=True)
    context.add_init_script(f"localStorage.setItem('openft.lastModel', {TINY!r})")
    page = context.new_page()
    routes = ["#/datasets", "#/new", "#/jobs", "#/playground", "#/models"]
    if flow.get("job"):
        routes += [f"#/jobs/{flow['job']}", f"#/compare/{flow['job']}"]
    try:
        for route in routes:
            page.goto(console_server.url + "/" + route)
            page.wait_for_selector("#page .card, #page .panes")
            page.wait_for_timeout(300)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 376, f"{route}: the page is {width}px wide at 375px"
            shot(page, artifacts, "mobile-" + route.strip("#/").split("/")[0])
        if flow.get("job"):
            shot(page, artifacts, "mobile-compare")
    finally:
        context.close()


def test_docs_screenshots_are_small():
    for f in DOCS_SHOTS.glob("*.png") if DOCS_SHOTS.exists() else []:
        assert f.stat().st_size < 400_000, f"{f.name} is {f.stat().st_size} bytes"
