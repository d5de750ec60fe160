"""Full fine-tuning over several ranks: FSDP2 sharding and its checkpoints.

Parameters, gradients and AdamW state are split across the ranks (`fully_shard`
per decoder layer, then the root), so memory per rank falls as ranks are added.
Checkpoints of a sharded run are written with torch.distributed.checkpoint (DCP):
every rank writes its own shard into the step's temporary folder, and the folder
is renamed into place by rank 0 only after DCP's closing barrier, i.e. after every
shard is on disk. DCP reshards on load, so such a checkpoint resumes on any number
of ranks, one included; a one-rank checkpoint (safetensors, `checkpoint.py`)
resumes on several ranks through the full state dict. DCP's `.metadata` file is a
pickle: it is only ever read from a run folder this run wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from openft.faults import fault_point
from openft.heap import release_free_memory
from openft.mapped import FileMaps
from openft.train import checkpoint, vocab_parallel
from openft.train.distributed import World
from openft.train.loss import HEAD_METHOD, chunked_head_loss

DCP_DIR = "dcp"  # inside a checkpoint folder: the sharded model and optimizer


def shard(model: nn.Module, root: nn.Module) -> None:
    """FSDP2 over `model`: one group per decoder layer (its weights are gathered
    just for its forward and backward), then `root` (the loss module that holds
    `model`) for the rest: the final norm (and tied tables that cannot be split
    by rows). `root` is what the recipe calls, so the root's hooks
    run. The embedding and head, tied or not, are split by vocabulary rows instead
    (`openft.train.vocab_parallel`): gathered whole, a 151k-vocabulary table
    (Qwen 0.5B, 545 MB in fp32) and its gradient kept each of 2 ranks at 0.695 of
    one rank's peak. Untied tables that do not fit that split (an embedding with
    a forward of its own, a head with a bias) get an FSDP2 group each; the chunked
    loss then reads the head's weight itself, so it runs as an FSDP forward
    method of the head."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers to shard (model.get_decoder().layers)")
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    maps = FileMaps()  # one snapshot: nothing writes into the model's file while it is sharded
    for layer in layers:
        _own_group(layer, mesh, maps)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    split: set[nn.Parameter] = set()  # split by rows here, left alone by FSDP2
    if vocab_parallel.fits_embedding(emb) and (head is None or vocab_parallel.fits_head(head)):
        vocab_parallel.shard_embedding(emb, mesh, maps)
        split.add(emb.weight)
        if head is not None:
            vocab_parallel.shard_head(head, mesh, maps, tied_to=emb.weight if tied else None)
            split.add(head.weight)
    elif not tied:  # tied tables that do not split stay with the root
        _own_group(emb, mesh, maps)
        if head is not None:
            shard_head(head, mesh, maps)
    own_memory(root, maps)
    fully_shard(root, mesh=mesh, ignored_params=split)
    # The whole weights each rank loaded are freed now, but the allocator would keep
    # them (tcmalloc holds what is freed): back to the OS, which counts them per rank.
    release_free_memory()


def _own_group(module: nn.Module, mesh, maps: FileMaps) -> None:
    """`module` in an FSDP2 group of its own, its weights owned first."""
    from torch.distributed.fsdp import fully_shard

    own_memory(module, maps)
    fully_shard(module, mesh=mesh)


def shard_head(head: nn.Module, mesh, maps: FileMaps) -> None:
    """An untied head in a group of its own, its loss a forward method of it."""
    import types

    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    own_memory(head, maps)
    setattr(head, HEAD_METHOD, types.MethodType(chunked_head_loss, head))
    fully_shard(head, mesh=mesh)
    register_fsdp_forward_method(head, HEAD_METHOD)


@torch.no_grad()
def own_memory(module: nn.Module, maps: FileMaps) -> None:
    """Give `module`'s weights memory of their own before sharding. A base loaded
    from safetensors is a view of the memory-mapped file, and FSDP2's shards keep
    views of it: the whole file stayed mapped, its touched pages resident (382 MB
    per rank for the 135M built-in, more than its shard). Done a layer at a time,
    so the copies never add up to a second model; each is copied a chunk at a time
    with the file's pages handed back as it goes (`openft.mapped`), since pages
    read from the mapping stay resident too."""
    for p in module.parameters():
        if not getattr(p, "_openft_owned", False):
            p.data = maps.copy(p.data, p.dtype)
            p._openft_owned = True


def is_sharded(model: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def is_sharded_param(p: torch.Tensor) -> bool:
    return _is_dtensor(p)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor; the tensor itself otherwise."""
    return t.to_local() if _is_dtensor(t) else t


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered onto rank 0's CPU (every rank must call it;
    the others get an empty dict)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in sd.items() if k not in tied_aliases(model)}


def tied_aliases(model: nn.Module) -> set[str]:
    """Names of weights that are another weight (the head tied to the embeddings),
    which a saved model leaves out as `save_pretrained` does."""
    seen: set[int] = set()
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return aliases


def save(run_dir: Path, model: nn.Module, optimizer, state: checkpoint.TrainerState, world: World) -> Path:
    """Checkpoint `state.step` of a sharded run; every rank calls it."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-{final.name}"
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = get_state_dict(model, optimizer)
    fault_point("checkpoint.write")
    # Returns on every rank only once all shards and the metadata are written.
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
    rngs = gather_rng(world)
    if world.main:
        checkpoint.write_rng(tmp, rngs)
        (tmp / checkpoint.STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
        if final.exists():  # the same step saved again (a resumed run): replace it
            gone = root / f".del-{final.name}"
            os.replace(final, gone)
            shutil.rmtree(gone, ignore_errors=True)
        os.replace(tmp, final)
        fault_point("checkpoint.commit")
    dist.barrier()
    return final


def load(ckpt: Path, model: nn.Module, optimizer, world: World) -> checkpoint.TrainerState:
    """Resume a full fine-tune from `ckpt` whatever world size wrote it: a DCP
    checkpoint reshards onto this world (the world of one included); a one-rank
    safetensors checkpoint is loaded whole by each rank, which keeps its shard."""
    if (ckpt / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(ckpt / DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        weights, optim = checkpoint.read_full(ckpt, model)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=weights,
            optim_state_dict=optim,
            options=StateDictOptions(full_state_dict=True),
        )
    checkpoint.read_rng(ckpt, world.rank)
    return checkpoint.read_state(ckpt)


def gather_rng(world: World) -> list[torch.Tensor]:
    """Every rank's torch RNG state, on every rank (rank 0 writes them)."""
    mine = torch.get_rng_state()
    if not world.distributed:
        return [mine]
    out: list = [None] * world.size
    dist.all_gather_object(out, mine)
    return out
