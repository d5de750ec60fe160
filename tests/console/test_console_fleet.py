"""The console's Fleet page (GET /v1/fleet) in a real headless chromium against a
real `openft serve --no-worker`: the server's own replica is listed alive; worker
rows written straight into the server's store (as `openft worker` processes would
write them) show their capabilities, state and what each runs (the caller's job as
a link, another owner's job unnamed, idle); a host name that looks like markup is
shown as text; the page refreshes itself."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from serve.conftest import TINY, Server, jsonl

from openft.jobs import fleet
from openft.jobs.db import database_url
from openft.jobs.store import Store, now

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "src" / "openft" / "examples"
HOSTILE = "<img src=x onerror=alert(1)>"
CAPS = {"cpus": 2, "gpus": 0, "max_ranks": 2}


@pytest.fixture(scope="module")
def console_server(tmp_path_factory, session_home, tiny_model_dir):
    s = Server(tmp_path_factory.mktemp("console-fleet-home"), "--no-worker", models={TINY: tiny_model_dir}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def store(console_server):
    """The server's own store (the same URL rule as `openft serve`: OPENFT_DATABASE_URL,
    else OPENFT_HOME/openft.db)."""
    s = Store(database_url(home=console_server.home))
    yield s
    s.close()


@pytest.fixture(scope="module")
def jobs(console_server):
    """Three queued jobs of the local owner (no worker runs them)."""
    client = console_server.client()
    rows = [json.loads(x) for x in (EXAMPLES / "lumen_train.jsonl").read_text().splitlines()[:12]]
    f = client.files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune")
    assert f.status == "processed", f.status_details
    ids = [
        client.fine_tuning.jobs.create(model=TINY, training_file=f.id, hyperparameters={"n_epochs": 1}).id
        for _ in range(3)
    ]
    deadline = time.time() + 60
    while {client.fine_tuning.jobs.retrieve(i).status for i in ids} != {"queued"}:
        assert time.time() < deadline, [client.fine_tuning.jobs.retrieve(i).status for i in ids]
        time.sleep(0.2)
    return ids


def join(store: Store, host: str, **row) -> fleet.Member:
    member = fleet.Member(kind="worker", host=host, capabilities=CAPS)
    store.fleet_join({**member.row(), **row})
    return member


def worker_row(page, member: fleet.Member):
    return page.locator(f"tr[data-member='{member.id}']")


def cells(row) -> list[str]:
    return [t.strip() for t in row.locator("td").all_inner_texts()]


def test_fleet_page_lists_replica_and_workers_and_shows_markup_as_text(console_server, store, jobs, page):
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    # Two workers each running a job: one of the caller's, one of another owner's.
    mine = join(store, "gpu-box-1")
    mine_job = store.claim_next_job(mine.id, mine.pid, max_ranks=2)
    store.fleet_beat(mine.id, job_id=mine_job["id"])
    other = join(store, "gpu-box-2")
    other_job = store.claim_next_job(other.id, other.pid, max_ranks=2)
    assert store.update_job(other_job["id"], owner="someone-else")
    store.fleet_beat(other.id, job_id=other_job["id"])
    hostile = join(store, HOSTILE)  # idle
    lost = join(store, "gone-box", heartbeat_at=time.time() - 600)
    stopped = join(store, "done-box", stopped_at=now())

    api = httpx.get(console_server.url + "/v1/fleet", timeout=10).json()
    assert len(api["replicas"]) == 1
    replica = api["replicas"][0]

    page.goto(console_server.url + "/#/fleet")
    page.wait_for_selector(f"tr[data-member='{replica['id']}']")
    assert page.locator("nav.tabs a[aria-current=page]").inner_text() == "Fleet"

    # The store and the job counts.
    store_card = page.locator("section.card", has=page.locator("h2:text-is('Job store')"))
    dd = lambda label: store_card.locator(f"dl.kv dt:text-is('{label}') + dd").inner_text()  # noqa: E731
    assert dd("Database") == api["store"]["dialect"] == store.dialect
    assert dd("URL") == api["store"]["url"]
    assert dd("Queued jobs") == "1" and dd("Running jobs") == "2"

    # This server's own replica, alive.
    r = cells(page.locator(f"tr[data-member='{replica['id']}']"))
    assert r[0] == replica["id"]
    assert r[2] == str(console_server.proc.pid)
    assert r[3] == f"127.0.0.1:{console_server.port}"
    assert r[4] == "alive"
    assert r[5].endswith(" s ago")

    # The workers: capabilities, state, what each runs.
    w = cells(worker_row(page, mine))
    assert w[:6] == [mine.id, "gpu-box-1", str(mine.pid), "2 cpus, 0 gpus, up to 2 ranks", "alive", w[5]]
    assert w[5].endswith(" s ago")
    link = worker_row(page, mine).locator("td.runs a")
    assert link.inner_text() == mine_job["id"] and link.get_attribute("href") == f"#/jobs/{mine_job['id']}"
    assert TINY in w[6] and "1 rank" in w[6]

    o = worker_row(page, other)
    assert o.locator("td.runs").inner_text() == "another owner's job"
    assert o.locator("td.runs a").count() == 0
    assert page.get_by_text(other_job["id"]).count() == 0  # another owner's job is not named

    assert worker_row(page, lost).locator(".badge").inner_text() == "lost"
    assert worker_row(page, stopped).locator(".badge").inner_text() == "stopped"
    workers_card = page.locator("section.card", has=page.locator("h2:text-is('Workers')"))
    assert workers_card.locator(".fleet-count").inner_text() == "3 alive of 5"

    # A host name that is markup stays text: no element made of it, no script run.
    h = worker_row(page, hostile)
    assert h.locator("td").nth(1).inner_text() == HOSTILE
    assert h.locator("td.runs").inner_text() == "idle"
    assert page.locator("#page img").count() == 0
    assert h.locator("td").nth(1).evaluate("td => td.children.length") == 0
    assert not dialogs, dialogs

    # It refreshes itself: the first worker finishes, a new one joins; no reload.
    store.fleet_beat(mine.id, job_id=None)
    late = join(store, "late-box")
    worker_row(page, late).wait_for(timeout=15_000)
    assert worker_row(page, mine).locator("td.runs").inner_text() == "idle"
    # And on the button.
    with page.expect_request(lambda req: req.url.endswith("/v1/fleet"), timeout=2_000):
        page.click("button:has-text('Refresh')")
    assert not page.console_errors, page.console_errors
    assert not dialogs, dialogs


def test_fleet_page_fits_a_narrow_screen(console_server, browser):
    context = browser.new_context(viewport={"width": 375, "height": 780}, is_mobile=True)
    page = context.new_page()
    try:
        page.goto(console_server.url + "/#/fleet")
        page.wait_for_selector("#page .card table")
        page.wait_for_timeout(300)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 376, f"the fleet page is {width}px wide at 375px"
    finally:
        context.close()
