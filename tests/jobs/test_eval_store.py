"""Eval runs in the store, on SQLite and on a real PostgreSQL server: concurrent
claims give each run to one worker, a lost lease writes nothing, a deleted eval
takes its runs and items with it, and a run taken over after its worker died
grades only the items it had not stored (EvalRunner on a jsonl run: no model)."""

from __future__ import annotations

import threading

from openft.jobs.evalworker import EvalRunner, requeue_stale_runs
from openft.jobs.store import Store

CRITERIA = [
    {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.a}}",
        "operation": "eq",
    }
]
CONFIG = {
    "type": "custom",
    "schema": {"type": "object", "properties": {"item": {"type": "object"}}, "required": ["item"]},
}


def make_run(store: Store, rows: list[dict]) -> tuple[dict, dict]:
    ev = store.create_eval(
        {"owner": "o", "name": "e", "data_source_config": CONFIG, "testing_criteria": CRITERIA, "metadata": None}
    )
    run = store.create_eval_run(
        {
            "owner": "o",
            "eval_id": ev["id"],
            "name": "r",
            "data_source": {"type": "jsonl", "source": {"type": "file_content", "content": rows}},
        }
    )
    return ev, run


def rows(n: int) -> list[dict]:
    return [{"item": {"a": str(i)}, "sample": {"output_text": str(i) if i % 3 else "no"}} for i in range(n)]


def test_concurrent_claimers_each_get_a_different_run(store_url):
    store = Store(store_url)
    runs = {make_run(store, rows(1))[1]["id"] for _ in range(6)}
    got: list[str] = []
    lock = threading.Lock()

    def claimer(i: int) -> None:
        mine = Store(store_url)
        while (run := mine.claim_next_eval_run(f"wrk-{i}")) is not None:
            with lock:
                got.append(run["id"])
            mine.update_eval_run(run["id"], lease=(f"wrk-{i}", run["attempts"]), status="completed")

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(runs)  # every run once, none twice


def test_a_stale_lease_writes_no_items_and_no_status(store_url):
    store = Store(store_url)
    _, run = make_run(store, rows(2))
    first = store.claim_next_eval_run("wrk-a")
    assert requeue_stale_runs(store, lambda w: w == "wrk-a") == [run["id"]]
    second = store.claim_next_eval_run("wrk-b")
    assert second["attempts"] == first["attempts"] + 1
    item = {
        "run_id": run["id"],
        "eval_id": run["eval_id"],
        "datasource_item_id": 0,
        "status": "pass",
        "datasource_item": {},
        "results": [],
    }
    assert not store.add_output_items([item], ("wrk-a", first["attempts"]))  # the old lease: refused
    assert not store.update_eval_run(run["id"], lease=("wrk-a", first["attempts"]), status="completed")
    assert store.add_output_items([item], ("wrk-b", second["attempts"]))
    assert store.add_output_items([item], ("wrk-b", second["attempts"]))  # again (a retried write): kept once
    assert len(store.all_output_items(run["id"])) == 1


def test_a_run_taken_over_grades_only_the_rest(store_url):
    store = Store(store_url)
    _, run = make_run(store, rows(40))
    claimed = store.claim_next_eval_run("wrk-dead")
    lease = ("wrk-dead", claimed["attempts"])
    # The dead worker had stored the first 16 items (one chunk) before it died.
    first = [
        {
            "run_id": run["id"],
            "eval_id": run["eval_id"],
            "datasource_item_id": i,
            "status": "pass",
            "datasource_item": {"a": str(i)},
            "results": [
                {
                    "name": "exact",
                    "type": "string_check",
                    "score": 1.0,
                    "passed": True,
                    "sample": None,
                    "marker": "first worker",
                }
            ],
        }
        for i in range(16)
    ]
    assert store.add_output_items(first, lease)
    requeue_stale_runs(store, lambda w: w == "wrk-dead")
    runner = EvalRunner(store)
    runner.run(store.claim_next_eval_run("wrk-new"))
    done = store.get_eval_run(None, None, run["id"])
    assert done["status"] == "completed", done["error"]
    items = store.all_output_items(run["id"])
    assert [i["datasource_item_id"] for i in items] == list(range(40))
    assert all(i["results"][0].get("marker") == "first worker" for i in items[:16])  # not graded again
    assert runner._engine is None  # string checks on given samples: no model was loaded
    graded = items[16:]
    assert all(i["status"] == ("pass" if i["datasource_item_id"] % 3 else "fail") for i in graded)
    counts = done["result_counts"]
    assert counts["total"] == 40 and counts["passed"] + counts["failed"] == 40


def test_deleting_an_eval_removes_its_runs_and_items(store_url):
    store = Store(store_url)
    ev, run = make_run(store, rows(3))
    claimed = store.claim_next_eval_run("wrk")
    EvalRunner(store).run(claimed)
    assert len(store.all_output_items(run["id"])) == 3
    assert store.delete_eval("o", ev["id"])
    assert store.get_eval_run(None, None, run["id"]) is None and store.all_output_items(run["id"]) == []
    assert not store.delete_eval("o", ev["id"])


def test_a_cancelled_run_is_left_cancelled(store_url):
    store = Store(store_url)
    _, run = make_run(store, rows(3))
    claimed = store.claim_next_eval_run("wrk")
    assert store.update_eval_run(run["id"], expect_status=("queued", "in_progress"), status="canceled")
    EvalRunner(store).run(claimed)
    assert store.get_eval_run(None, None, run["id"])["status"] == "canceled"
    assert store.all_output_items(run["id"]) == []
