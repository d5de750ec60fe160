"""Training on several ranks with torch.distributed, launched by torchrun.

Two sides, one module:
- `Launch` is what the caller asks for (ranks per node, nodes, rendezvous); the CLI
  flags, the worker's flags and a job's `resources` all parse into it, and
  `openft.train.launch` turns it into a torchrun command line.
- `World` is what a rank sees once started: its rank, the world size, the process
  group (gloo on a CPU, NCCL on GPUs) and the few collectives the recipe needs.
  One process without torchrun is the world of one, so the recipe has one code path.

Rendezvous is torchrun's own (c10d): no launcher or collective of our own.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 300.0  # a collective that waits longer is a hung or dead rank: an error, not a hang
_ENDPOINT = re.compile(r"^[A-Za-z0-9_.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")


class LaunchError(ValueError):
    """A launch request that cannot run (bad counts, a missing rendezvous endpoint)."""


def check_objective(objective: str) -> None:
    """What several ranks cannot train yet (LaunchError): DPO."""
    if objective == "dpo":
        raise LaunchError("DPO trains on one rank for now: run it without --nproc-per-node/--nnodes")


@dataclass(frozen=True)
class Launch:
    """How many training processes, where: torchrun's `--nproc-per-node`,
    `--nnodes`, `--node-rank` and `--rdzv-endpoint`, plus its `--max-restarts`."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT of the c10d rendezvous; needed when nnodes > 1
    max_restarts: int = 1  # torchrun restarts every rank this often after a rank dies; each resumes

    def __post_init__(self) -> None:
        for name in ("nproc_per_node", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1024:
                raise LaunchError(f"{name} must be a whole number from 1 to 1024, not {value!r}")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"node_rank must be from 0 to nnodes-1 ({self.nnodes - 1}), not {self.node_rank!r}")
        if not isinstance(self.max_restarts, int) or not 0 <= self.max_restarts <= 100:
            raise LaunchError(f"max_restarts must be from 0 to 100, not {self.max_restarts!r}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise LaunchError("a run on more than one node needs --rdzv-endpoint HOST:PORT (the c10d rendezvous)")
        if self.rdzv_endpoint and not _ENDPOINT.match(self.rdzv_endpoint):
            raise LaunchError(f"rdzv_endpoint must be HOST:PORT, not {self.rdzv_endpoint!r}")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        """More than one rank in all: training goes through torchrun."""
        return self.world_size > 1

    @classmethod
    def from_resources(cls, resources: dict | None, default: Launch | None = None) -> Launch:
        """A job's `resources` ({"nproc_per_node": 2}) over the worker's own launch flags."""
        base = default or cls()
        if not resources:
            return base
        n = resources.get("nproc_per_node", base.nproc_per_node)
        return cls(
            nproc_per_node=n,
            nnodes=base.nnodes,
            node_rank=base.node_rank,
            rdzv_endpoint=base.rdzv_endpoint,
            max_restarts=base.max_restarts,
        )


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 alone reports progress, writes events, metrics and files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE;
        without them, the world of one."""
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        return cls(
            rank=int(env["RANK"]),
            size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )

    def from_main(self, fn):
        """`fn()` run on rank 0, its result given to every rank."""
        if not self.distributed:
            return fn()
        box = [fn() if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def device(self) -> torch.device:
        """The rank's GPU where there are GPUs, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def current() -> World:
    """The world of the running process (after `init`; the world of one before)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World.from_env()


def init(timeout_s: float | None = None) -> World:
    """Join the process group torchrun set up for this rank (idempotent). Every
    collective then fails after `timeout_s` instead of waiting for ever on a rank
    that died or hangs (OPENFT_COLLECTIVE_TIMEOUT_S overrides the default)."""
    world = World.from_env()
    if not world.distributed or dist.is_initialized():
        return world
    seconds = timeout_s or float(os.environ.get("OPENFT_COLLECTIVE_TIMEOUT_S") or COLLECTIVE_TIMEOUT_S)
    if torch.cuda.is_available():
        torch.cuda.set_device(world.device())
    timeout = datetime.timedelta(seconds=seconds)
    # The store torchrun's agent serves can outlive an attempt: under a prefix of its
    # own, a restarted rank never reads the addresses its dead predecessors
    # published (seen as "connectFullMesh ... Connection refused" after a restart).
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    tcp = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size, is_master=False, timeout=timeout
    )
    store = dist.PrefixStore(f"openft/attempt-{attempt}", tcp)
    dist.init_process_group(backend=backend(), store=store, rank=world.rank, world_size=world.size, timeout=timeout)
    return world


def shutdown(*, together: bool = False) -> None:
    """Leave the process group. `together`: first wait for every rank, so that no
    rank tears its connections down while another still reads them (gloo aborts
    the reader: a finished run ended as a SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
