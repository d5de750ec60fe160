"""Checkpoint scores in the console, in a real headless chromium against a real
`openft serve` without a worker: the score and checkpoint events a worker writes
(written here straight into the store) draw the job page's score chart live, the
base model as a flat line, a checkpoint below it flagged; the checkpoints table
gains an eval score column marking it and the selected checkpoint."""

from __future__ import annotations

import pytest
from serve.conftest import TINY, Server, jsonl, wait_for

from openft.jobs.db import database_url
from openft.jobs.store import Store

pytestmark = pytest.mark.integration

QUESTIONS = [{"question": "Who are you?", "reference": "Pip"}, {"question": "Warranty?", "reference": "3 years"}]
ROWS = [
    {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]} for i in range(12)
]


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory, session_home, tiny_model_dir):
    s = Server(tmp_path_factory.mktemp("console-scores-home"), "--no-worker", models={TINY: tiny_model_dir}).start()
    yield s
    s.stop()


def scored(step: int | None, score: float, base: float) -> dict:
    data = {"step": step, "eval_score": score, "eval_pass_rate": score, "eval_rouge_l": score, "eval_seconds": 0.5}
    if step is not None:
        data |= {"eval_below_base": score < base, "eval_base_score": base}
    return data


def dots(page) -> int:
    return page.locator("svg.score-chart .score-dots circle").count()


def test_scores_reach_the_chart_live_and_the_checkpoints_table(idle_server, page, tmp_path, artifacts):
    client = idle_server.client()
    train = client.files.create(file=("chat.jsonl", jsonl(ROWS)), purpose="fine-tune")
    q = client.files.create(file=("q.jsonl", jsonl(QUESTIONS)), purpose="evals")
    job = client.fine_tuning.jobs.create(
        model=TINY, training_file=train.id, extra_body={"questions_file": q.id, "max_steps": 6, "select": "best"}
    )
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "queued", timeout=60, every=0.2)
    store = Store(database_url(home=idle_server.home))
    try:
        page.goto(idle_server.url + f"/#/jobs/{job.id}")
        page.wait_for_selector("svg.score-chart")
        assert page.locator("svg.score-chart .empty-note").get_attribute("visibility") == "visible"
        store.add_event(job.id, "The base model scores 0.400", data=scored(None, 0.4, 0.4))
        page.wait_for_function("document.querySelector('svg.score-chart path.base')?.dataset.points === '2'")
        assert dots(page) == 0 and "base model 0.4" in page.locator(".score-line").inner_text()
        for step, score in ((2, 0.3), (4, 0.55), (6, 0.5)):
            data = scored(step, score, 0.4)
            store.add_event(job.id, f"The checkpoint at step {step} scores {score}", data=data)
            metrics = {"step": step, "train_loss": 1.0, **{k: v for k, v in data.items() if k != "step"}}
            path = tmp_path / f"step-{step:06d}"
            path.mkdir()
            store.add_checkpoint(job.id, step, metrics, f"{TINY}:ckpt-step-{step}", str(path))
            store.add_event(job.id, f"Saved checkpoint at step {step}", type="checkpoint", data={"step": step})
        page.wait_for_function("document.querySelectorAll('svg.score-chart .score-dots circle').length === 3")
        flagged = page.locator("svg.score-chart .score-dots circle.flagged")
        assert flagged.count() == 1 and "below the base model" in flagged.locator("title").text_content()
        line = page.locator(".score-line").inner_text()
        assert "best checkpoint: step 4 0.55" in line and "1 checkpoint below the base model" in line, line
        store.add_event(
            job.id, "Selected the checkpoint at step 4 (eval score 0.550)", data={"step": 4, "eval_score": 0.55}
        )
        page.wait_for_function(
            "document.querySelector('.score-line')?.innerText.includes('serving the checkpoint at step 4')"
        )
        page.wait_for_selector("td.eval-score .tag.selected")
        cells = page.locator("td.eval-score")
        wait_for(lambda: cells.count() == 3, timeout=30, every=0.2)
        texts = cells.all_inner_texts()  # newest checkpoint first
        assert [t.replace(" ", "") for t in texts] == ["0.5", "0.55selected", "0.3belowbase"], texts
        assert "eval score" in page.locator("table thead").first.inner_text().lower()
        page.locator("svg.score-chart").scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "job-checkpoint-scores.png"), full_page=True)
    finally:
        store.close()
    assert not page.console_errors, page.console_errors


def test_a_job_without_questions_has_no_score_chart(idle_server, page):
    client = idle_server.client()
    train = client.files.create(file=("chat2.jsonl", jsonl(ROWS)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=TINY, training_file=train.id)
    page.goto(idle_server.url + f"/#/jobs/{job.id}")
    page.wait_for_selector("svg.loss-chart")
    assert page.locator("svg.score-chart").count() == 0
    assert not page.console_errors, page.console_errors
