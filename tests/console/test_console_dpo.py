"""DPO in the console, in a real headless chromium against a real `openft serve`:
the New job form's Method choice sends OpenAI's `method={"type": "dpo", ...}` body
with the beta entered (and the supervised default still sends what it always did);
DPO on a chat file shows the API's 400 message and the form's layout hint; a DPO
job run on the tiny model shows its method and a reward chart with one point per
metrics event; and on a server without a worker, metrics events written straight
into the store (as a worker writes them) reach the reward chart live, the latest
train and valid reward accuracy shown as text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from serve.conftest import TINY, Server, jsonl, wait_for
from train.helpers import preference_rows

from openft.jobs.db import database_url
from openft.jobs.store import Store

pytestmark = pytest.mark.integration


def pairs(n: int = 24) -> bytes:
    return jsonl(preference_rows(n))


def chat_rows(n: int = 12) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
        for i in range(n)
    ]


def upload(server: Server, name: str, data: bytes) -> str:
    f = server.client().files.create(file=(name, data), purpose="fine-tune")
    assert f.status == "processed", f.status_details
    return f.id


@pytest.fixture(scope="module")
def files(console_server):
    pref = console_server.client().files.retrieve(upload(console_server, "prefs.jsonl", pairs()))
    assert pref.validation["layout"] == "openai_preference"
    return {"pairs": pref.id, "chat": upload(console_server, "chat.jsonl", jsonl(chat_rows()))}


@pytest.fixture(scope="module")
def flow():
    return {}


def open_form(page, url: str, training_file: str):
    page.goto(url + f"/#/new?training_file={training_file}")
    page.wait_for_selector("form.newjob")
    page.fill("input[name=model]", TINY)


def submit(page):
    """Submits the form; the body the console sent to POST /v1/fine_tuning/jobs."""
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/fine_tuning/jobs")) as req:
        page.click("form.newjob button[type=submit]")
    return req.value.post_data_json


def detail(page, name: str) -> str:
    dd = page.locator(f"dl.kv dt:text-is('{name}') + dd")
    dd.wait_for()
    return dd.inner_text()


def points(page, series: str) -> int:
    return int(page.locator(f"svg.reward-chart path.{series}").get_attribute("data-points") or 0)


def metrics_events(server: Server, job_id: str) -> list[dict]:
    events = server.client().fine_tuning.jobs.list_events(job_id, limit=1000).data
    return [e.data for e in events if e.type == "metrics" and e.data and "step" in e.data]


def test_the_supervised_default_sends_what_it_always_sent(console_server, files, page):
    # Answered here (no job is created): only the body is looked at.
    page.route(
        re.compile(r".*/v1/fine_tuning/jobs$"),
        lambda route: route.fulfill(
            status=400,
            content_type="application/json",
            body=json.dumps({"error": {"message": "not created here", "type": "invalid_request_error"}}),
        ),
    )
    open_form(page, console_server.url, files["pairs"])
    assert page.locator("select[name=method_type]").input_value() == "supervised"
    assert page.locator("input[name=beta]").is_hidden()
    page.fill("input[name=n_epochs]", "2")
    sent = submit(page)
    assert "method" not in sent
    assert sent["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    page.wait_for_selector("#banner.error")
    assert "not created here" in page.locator("#banner").inner_text()
    assert not page.console_errors, page.console_errors


def test_dpo_on_a_chat_file_shows_the_apis_error(console_server, files, page):
    open_form(page, console_server.url, files["chat"])
    assert page.locator(".layout-hint").is_hidden()
    page.select_option("select[name=method_type]", "dpo")
    assert page.locator("input[name=beta]").is_visible()
    hint = page.locator(".layout-hint")
    hint.wait_for()
    assert "preference pairs" in hint.inner_text() and "'messages'" in hint.inner_text()
    sent = submit(page)
    assert sent["method"]["type"] == "dpo" and sent["method"]["dpo"]["hyperparameters"]["beta"] == "auto"
    page.wait_for_selector("#banner.error")
    text = page.locator("#banner").inner_text()
    assert "a dpo job trains on preference pairs" in text and files["chat"] in text and "(training_file)" in text
    assert page.locator("select[name=training_file].invalid").count() == 1
    assert "#/new" in page.url  # no job: the form stays
    # A preference file: the hint goes.
    page.select_option("select[name=training_file]", files["pairs"])
    assert page.locator(".layout-hint").is_hidden()
    # A beta out of range: the API's message, and the field marked.
    page.fill("input[name=beta]", "5")
    sent = submit(page)
    assert sent["method"]["dpo"]["hyperparameters"]["beta"] == 5
    page.locator("#banner.error", has_text="beta must be in (0, 2]").wait_for()
    assert page.locator("input[name=beta].invalid").count() == 1
    assert not console_server.client().fine_tuning.jobs.list().data  # neither created a job
    assert not page.console_errors, page.console_errors


def shot(page, artifacts: Path, name: str) -> None:
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def test_dpo_through_the_form_creates_a_dpo_job_with_the_beta(console_server, files, page, artifacts, flow):
    open_form(page, console_server.url, files["pairs"])
    page.select_option("select[name=method_type]", "dpo")
    page.fill("input[name=beta]", "0.2")
    page.fill("input[name=n_epochs]", "2")
    page.fill("input[name=batch_size]", "4")
    page.fill("input[name=learning_rate]", "0.005")  # the tiny model learns at this rate (tests/serve)
    page.fill("input[name=seed]", "1")
    page.wait_for_selector(".estimate-line", timeout=60_000)
    assert "DPO" in page.locator(".estimate-line").inner_text()
    shot(page, artifacts, "new-job-dpo")
    sent = submit(page)
    hp = {"beta": 0.2, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}
    assert sent["method"] == {"type": "dpo", "dpo": {"hyperparameters": hp}}
    assert "hyperparameters" not in sent and sent["learning_rate"] == 0.005
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[-1]
    flow["job"] = job_id
    job = console_server.client().fine_tuning.jobs.retrieve(job_id)
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    # The job page says so, and has a reward chart.
    assert detail(page, "Method") == "DPO (preference pairs), beta 0.2"
    assert "DPO" in page.locator("h1 .method-tag").inner_text()
    page.wait_for_selector("svg.reward-chart")
    assert page.locator(".card h2:text-is('Rewards')").count() == 1
    assert not page.console_errors, page.console_errors


def test_a_dpo_job_page_charts_one_reward_point_per_metrics_event(console_server, page, artifacts, flow):
    assert flow.get("job"), "needs the job of the previous test"
    job_id = flow["job"]
    page.goto(console_server.url + f"/#/jobs/{job_id}")
    page.wait_for_selector(".badge.status-succeeded, .badge.status-failed", timeout=300_000)
    assert page.locator("h1 .badge").inner_text() == "succeeded", page.locator(".error-box").all_inner_texts()
    steps = metrics_events(console_server, job_id)
    assert steps and all("train_chosen_reward" in s and "train_rejected_reward" in s for s in steps)
    # Every metrics event is a point of each train series, in step order.
    page.wait_for_function(
        "n => Number(document.querySelector('svg.reward-chart path.chosen')?.dataset.points || 0) === n", arg=len(steps)
    )
    for series in ("chosen", "rejected", "margin"):
        assert points(page, series) == len(steps), series
        d = page.locator(f"svg.reward-chart path.{series}").get_attribute("d")
        assert d.startswith("M") and d.count("L") == len(steps) - 1, series
    valid = [s for s in steps if "valid_reward_margin" in s]
    assert points(page, "valid") == len(valid)
    assert page.locator("svg.reward-chart .valid-dots circle").count() == len(valid)
    # The latest reward accuracy as text.
    last = max(steps, key=lambda s: s["step"])
    line = page.locator(".reward-line").inner_text()
    assert f"train {last['train_reward_accuracy'] * 100:.1f}% (step {last['step']})" in line, line
    assert valid  # the held-out split is validated along the way
    v = max(valid, key=lambda s: s["step"])
    assert f"valid {v['valid_reward_accuracy'] * 100:.1f}% (step {v['step']})" in line, line
    assert "Reward accuracy" in page.locator(".progress-card dl.kv").inner_text()
    # The loss chart is still there, with the same points.
    assert int(page.locator("svg.loss-chart path.train").get_attribute("data-points")) == len(steps)
    page.wait_for_selector("text=:ckpt-step-")
    assert page.locator("th:text-is('Valid reward accuracy')").count() == 1
    shot(page, artifacts, "job-dpo")
    # Clone with changes keeps the method and the beta.
    page.click("a:has-text('Clone with changes')")
    page.wait_for_selector("form.newjob")
    assert page.locator("select[name=method_type]").input_value() == "dpo"
    assert page.locator("input[name=beta]").input_value() == "0.2"
    assert page.locator("input[name=n_epochs]").input_value() == "2"
    assert not page.console_errors, page.console_errors


# ---- live, with events written into the store --------------------------------------


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory, session_home, tiny_model_dir):
    """No worker: a job stays queued, its metrics events are the test's to write."""
    s = Server(tmp_path_factory.mktemp("console-dpo-home"), "--no-worker", models={TINY: tiny_model_dir}).start()
    yield s
    s.stop()


def step_data(step: int, total: int, *, valid: bool = False) -> dict:
    chosen, rejected = 0.05 * step, -0.04 * step
    data = {
        "step": step,
        "total_steps": total,
        "train_loss": 0.69 - 0.03 * step,
        "train_chosen_reward": chosen,
        "train_rejected_reward": rejected,
        "train_reward_margin": chosen - rejected,
        "train_reward_accuracy": min(1.0, 0.5 + 0.125 * step),
    }
    if valid:
        data |= {
            "valid_loss": 0.7 - 0.02 * step,
            "valid_chosen_reward": chosen / 2,
            "valid_rejected_reward": rejected / 2,
            "valid_reward_margin": (chosen - rejected) / 2,
            "valid_reward_accuracy": 0.25 * step,
        }
    return data


def test_metrics_events_reach_the_reward_chart_live(idle_server, page):
    client = idle_server.client()
    f = upload(idle_server, "prefs.jsonl", pairs(12))
    job = client.fine_tuning.jobs.create(model=TINY, training_file=f, method={"type": "dpo"})
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "queued", timeout=60, every=0.2)
    store = Store(database_url(home=idle_server.home))
    try:
        page.goto(idle_server.url + f"/#/jobs/{job.id}")
        page.wait_for_selector("svg.reward-chart")
        assert detail(page, "Method") == "DPO (preference pairs), beta auto (0.1)"
        assert page.locator("svg.reward-chart .empty-note").get_attribute("visibility") == "visible"
        for step in (1, 2, 3):
            store.add_event(job.id, f"Step {step}/6: training loss=0.6", type="metrics", data=step_data(step, 6))
        page.wait_for_function("Number(document.querySelector('svg.reward-chart path.chosen')?.dataset.points) === 3")
        assert points(page, "rejected") == 3 and points(page, "margin") == 3 and points(page, "valid") == 0
        assert "train 87.5% (step 3)" in page.locator(".reward-line").inner_text()
        assert "valid" not in page.locator(".reward-line").inner_text()
        # A validation step: its margin is a dot, its accuracy is shown beside the train one.
        store.add_event(job.id, "Step 4/6", type="metrics", data=step_data(4, 6, valid=True))
        store.add_event(job.id, "Step 5/6", type="metrics", data=step_data(5, 6))
        page.wait_for_function("Number(document.querySelector('svg.reward-chart path.chosen')?.dataset.points) === 5")
        assert points(page, "valid") == 1
        assert page.locator("svg.reward-chart .valid-dots circle").count() == 1
        line = page.locator(".reward-line").inner_text()
        assert "train 100.0% (step 5)" in line and "valid 100.0% (step 4)" in line, line
        # Rewards go below zero: the chart draws a zero line.
        assert page.locator("svg.reward-chart line.zero").get_attribute("visibility") == "visible"
        assert page.locator("svg.reward-chart .empty-note").get_attribute("visibility") == "hidden"
    finally:
        store.close()
    assert not page.console_errors, page.console_errors


def test_a_supervised_job_page_has_no_reward_chart(idle_server, page):
    client = idle_server.client()
    f = upload(idle_server, "chat.jsonl", jsonl(chat_rows()))
    job = client.fine_tuning.jobs.create(model=TINY, training_file=f, hyperparameters={"n_epochs": 1})
    page.goto(idle_server.url + f"/#/jobs/{job.id}")
    assert detail(page, "Method") == "Supervised"
    page.wait_for_selector("svg.loss-chart")
    assert page.locator("svg.reward-chart").count() == 0
    assert not page.console_errors, page.console_errors
