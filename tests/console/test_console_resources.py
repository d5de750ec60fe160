"""The job form's "Ranks (processes)" field (issue 17) in a real headless chromium
against a real `openft serve --no-worker` (the jobs stay queued: what is checked is
the form, the request it sends and the job page, not training): 2 ranks are sent as
`resources.nproc_per_node`, shown as "2 ranks" on the job's page and kept by a
clone; an empty field sends no resources and the page says "1 rank"."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from serve.conftest import TINY, Server, jsonl

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"


@pytest.fixture(scope="module")
def console_server(tmp_path_factory, session_home, tiny_model_dir):
    s = Server(tmp_path_factory.mktemp("console-resources-home"), "--no-worker", models={TINY: tiny_model_dir}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def train_file(console_server):
    rows = [json.loads(x) for x in (EXAMPLES / "lumen_train.jsonl").read_text().splitlines()[:12]]
    f = console_server.client().files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune")
    assert f.status == "processed", f.status_details
    return f.id


def create_through_form(page, url: str, train_file: str, ranks: str) -> tuple[str, dict]:
    """Fill the New job form, submit it; the job's id and the body the console sent."""
    page.goto(url + f"/#/new?training_file={train_file}")
    page.wait_for_selector("form.newjob")
    page.fill("input[name=model]", TINY)
    page.fill("input[name=max_steps]", "1")
    page.fill("input[name=nproc_per_node]", ranks)
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/v1/fine_tuning/jobs")) as req:
        page.click("form.newjob button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    return page.url.rsplit("/", 1)[-1], req.value.post_data_json


def shown_resources(page) -> str:
    dd = page.locator("dl.kv dt:text-is('Resources') + dd")
    dd.wait_for()
    return dd.inner_text()


def test_two_ranks_through_the_form_are_sent_shown_and_cloned(console_server, page, train_file):
    job_id, sent = create_through_form(page, console_server.url, train_file, "2")
    assert sent["resources"] == {"nproc_per_node": 2}
    assert shown_resources(page) == "2 ranks"
    assert console_server.client().fine_tuning.jobs.retrieve(job_id).resources == {"nproc_per_node": 2}
    page.click("a:has-text('Clone with changes')")
    page.wait_for_selector("form.newjob")
    assert page.locator("input[name=nproc_per_node]").input_value() == "2"
    assert not page.console_errors, page.console_errors


def test_an_empty_ranks_field_sends_no_resources(console_server, page, train_file):
    job_id, sent = create_through_form(page, console_server.url, train_file, "")
    assert "resources" not in sent  # the worker's own setting decides
    assert shown_resources(page) == "1 rank"
    assert not page.console_errors, page.console_errors
