"""The run folder check of a launch on several nodes: another node's launcher may
write its spec and log before node 0 looks, and that is not a run."""

from __future__ import annotations

import pytest

from openft.config import JobSpec
from openft.train.distributed import Launch
from openft.train.launch import clear_logs, holds_run, prepare_run_dir


def two_nodes(node_rank: int) -> Launch:
    return Launch(nproc_per_node=1, nnodes=2, node_rank=node_rank, rdzv_endpoint="127.0.0.1:29500")


def test_node_1_starting_first_leaves_a_folder_node_0_accepts(tmp_path):
    spec = JobSpec(output_dir=str(tmp_path / "run"))
    run = prepare_run_dir(spec, two_nodes(1), resume=False)
    (run / ".dist" / "spec-node1.json").write_text("{}")
    (run / "logs").mkdir()
    (run / "logs" / "torchrun-node1.log").write_text("node 1 waiting\n")
    assert not holds_run(run)
    assert prepare_run_dir(spec, two_nodes(0), resume=False) == run


def test_a_folder_with_a_run_in_it_is_refused_on_node_0_only(tmp_path):
    spec = JobSpec(output_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert holds_run(tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a run"):
        prepare_run_dir(spec, two_nodes(0), resume=False)
    prepare_run_dir(spec, two_nodes(1), resume=False)  # node 0 decides
    prepare_run_dir(spec, two_nodes(0), resume=True)


def test_clearing_logs_keeps_the_other_nodes_launcher_logs(tmp_path):
    logs = tmp_path / "logs"
    (logs / "old-rdzv" / "attempt_0").mkdir(parents=True)
    (logs / "old-rdzv" / "attempt_0" / "stdout.log").write_text("stale")
    for name in ("torchrun-node0.log", "torchrun-node1.log", "torchrun-node2.log"):
        (logs / name).write_text("x")
    clear_logs(logs, node_rank=0)
    assert sorted(p.name for p in logs.iterdir()) == ["torchrun-node1.log", "torchrun-node2.log"]
    clear_logs(tmp_path / "absent", node_rank=0)  # nothing to clear is no error
