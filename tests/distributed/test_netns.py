"""Two machines on one box (issue 17): the namespace harness, and a 2-node torchrun whose
c10d rendezvous and gloo all_reduce cross the veth between them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from distributed.netns import check_reach, netns_hosts, run_on_both, two_hosts  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def test_hosts_reach_each_other_over_the_veth_and_are_gone_after(tmp_path):
    with two_hosts() as hosts:
        a, b = hosts
        assert {a.name, b.name} <= namespaces()
        assert a.ip != b.ip and a.ip.rsplit(".", 1)[0] == b.ip.rsplit(".", 1)[0]
        for h in hosts:  # each end lives in its namespace, not on the box
            assert h.ifname not in links()
            assert f"inet {h.ip}/24" in h.run(["ip", "-o", "addr", "show", "dev", h.ifname], check=True).stdout
        check_reach(a, b)
        check_reach(b, a)
        # a process left running in a namespace is killed on the way out
        left = a.popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    assert left.wait(timeout=30) != 0
    assert not {a.name, b.name} & namespaces()
    assert a.ifname not in links() and b.ifname not in links()


def test_namespaces_are_removed_when_the_test_fails():
    with pytest.raises(RuntimeError, match="the test failed"), two_hosts() as hosts:
        names = {h.name for h in hosts}
        raise RuntimeError("the test failed")
    assert not names & namespaces()


def test_skips_with_the_reason_when_the_machine_has_no_iproute2(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `ip` on it
    with pytest.raises(pytest.skip.Exception, match="iproute2"), two_hosts():
        pass


RANK_SCRIPT = """
import json, os, socket, sys
import torch, torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
# the hostname resolves to the address of the namespace the rank runs in
out = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item(), "ip": socket.gethostbyname(socket.gethostname())}
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
"""


def test_two_node_torchrun_rendezvous_and_all_reduce_cross_the_namespaces(netns_hosts, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    endpoint, rdzv_id = f"{netns_hosts.a.ip}:{netns_hosts.a.free_port()}", uuid.uuid4().hex[:12]

    def argv(i, host):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(i), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                "--rdzv-id", rdzv_id, "--max-restarts", "0", str(script), str(tmp_path)]  # fmt: skip

    results = run_on_both(netns_hosts, argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    for h, r in zip(netns_hosts, results):
        assert r.returncode == 0, f"{h.name}: exit {r.returncode}\n{r.stderr[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [(r["rank"], r["world"], r["sum"]) for r in ranks] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert {r["ip"] for r in ranks} == {netns_hosts.a.ip, netns_hosts.b.ip}  # one rank on each host


HANG = [sys.executable, "-c", "import signal; signal.pause()"]  # a peer that waits forever


def test_run_on_both_kills_the_peer_of_a_failed_host_after_the_grace(netns_hosts):
    fail = [sys.executable, "-c", "import sys; print('no', file=sys.stderr); sys.exit(3)"]
    a, b = run_on_both(netns_hosts, lambda i, h: fail if i == 0 else HANG, timeout=120, grace=1)
    assert (a.returncode, a.stderr.strip()) == (3, "no")
    assert b.returncode == -9


def test_run_on_both_raises_with_both_outputs_past_the_timeout(netns_hosts):
    say = [
        sys.executable,
        "-c",
        "import os, signal; print(os.environ['GLOO_SOCKET_IFNAME'], flush=True); signal.pause()",
    ]
    with pytest.raises(TimeoutError, match="still running after 2s") as e:
        run_on_both(netns_hosts, lambda i, h: say, timeout=2)
    for h in netns_hosts:  # each ran in its own host, told its own interface
        assert f"--- {h.name} ---\n{h.ifname}" in str(e.value)


def test_openft_finetune_on_two_nodes_equals_the_one_rank_run(netns_hosts, tiny_model_dir, tmp_path):
    """`openft finetune` on each "machine", one rank each, c10d across the veth,
    into one shared run folder: the job succeeds and ends where one rank ends."""
    from train.helpers import write_chat_jsonl
    from train.test_distributed import FLAGS, TOL, apart

    data = write_chat_jsonl(tmp_path / "train.jsonl", n=20)
    base = [sys.executable, "-m", "openft.cli", "finetune", "--model", str(tiny_model_dir), "--data", str(data), *FLAGS]
    one = tmp_path / "one"
    single = subprocess.run([*base, "--output", str(one)], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    endpoint = f"{netns_hosts.a.ip}:{netns_hosts.a.free_port()}"
    two = tmp_path / "two"

    def argv(i, host):
        return [*base, "--output", str(two), "--nnodes", "2", "--node-rank", str(i), "--rdzv-endpoint", endpoint]

    results = run_on_both(netns_hosts, argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    for h, r in zip(netns_hosts, results):
        assert r.returncode == 0, f"{h.name}: exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Run folder" in results[0].stdout  # node 0 reports
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert apart("lora", one, two, tiny_model_dir) <= TOL
    assert sorted(p.name for p in (two / "logs").glob("torchrun-node*.log")) == [
        "torchrun-node0.log",
        "torchrun-node1.log",
    ]
