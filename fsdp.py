"""Sharded training with PyTorch's FSDP2 (`fully_shard`): every process holds 1/N of every tensor,
the frozen base included, so a model that fits no single device (LLaMA2-70B: 138 GB in bf16) trains.

    torchrun --nproc_per_node 8 train.py --model /ckpt/Llama-2-70b-hf --method lorada_la --fsdp ...

How a model becomes sharded, without any process ever holding all of it (shard()):
  1. checkpoint.load(path, dtype=None, device=None) builds the model with the checkpoint's tensors
     as memory-mapped views: nothing is read yet. The method is applied to it as in a one-process
     run (same seed, same random draws), so its tensors start exactly as there.
  2. The method's tensors are set aside (they are small), and the whole model moves to the meta
     device in its training dtypes (the base in bf16 on a GPU, the method's tensors in fp32).
  3. fully_shard: one unit per transformer block, then the root (embeddings, final norm, head, a
     prefix encoder). On the meta device this only records the layout: dimension 0 of every
     tensor split into N chunks (torch.chunk), chunk k on process k.
  4. to_empty allocates each process's chunks, and fill() copies into them the rows of chunk k, from
     the memory-mapped checkpoint (only those pages are read) or from the method's tensors.
Gradients are reduce-scattered by FSDP and summed (divide factor 1), as train.py's loss is
already divided by the step's total units over all processes.

Checkpoints gather the trainable tensors and AdamW's state to full tensors (small for every PEFT
method) and process 0 writes them; on --resume each process takes its chunks again, so the run
continues bit for bit with the same process count. The adapter file is a one-process run's.

What train.py calls takes a sharded model and a plain one alike, so train.py has no sharded
special case: micro_batch_share (the loop's part of each step), full_tensors / load_full_tensors
and optimizer_state / load_optimizer_state (checkpoints and adapters).
"""
import math
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

import hub
import model as M


def check_flags(args):
    """--fsdp's requirements, before any process group is set up."""
    if not args.fsdp or args.dry_run:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError("--fsdp shards the model over several processes: start it with "
                         "torchrun --nproc_per_node N train.py ... (N >= 2)")
    if args.compile:
        raise ValueError("--fsdp with --compile is not supported: drop --compile (each block would "
                         "have to be compiled inside its FSDP unit)")
    if (args.model in M.LLAMA_PRESETS or args.model in M.ENCDEC_PRESETS) and args.model not in hub.PAPER_MODELS \
            and not os.path.exists(args.model):
        raise ValueError(f"--model {args.model} is a shape preset without weights: give a checkpoint path")


def blocks(model):
    """The transformer blocks, one FSDP unit each (the root holds the rest)."""
    if isinstance(model, M.Bart):
        return [*model.encoder.layers, *model.decoder.layers]
    return list(model.layers)


def chunk_rows(n: int, world: int, rank: int) -> slice:
    """The rows of dimension 0 that process `rank` holds: torch.chunk's split, as FSDP2 uses (chunks
    of ceil(n / world) rows; the last ones may be shorter or empty)."""
    size = math.ceil(n / world)
    return slice(min(rank * size, n), min((rank + 1) * size, n))


def local(t):
    """A parameter's local chunk (a DTensor after sharding), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard(model, dtype, device):
    """Steps 2-4 of the module docstring, on a model built with checkpoint.load(path, None, None)
    and adapted with methods.apply_method. `dtype`: the frozen base's training dtype (the method's
    own tensors keep theirs). Returns the model, sharded, on `device`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sources = tensors_of(model)                        # the base's: memory-mapped views; the method's: real
    with torch.no_grad():                                             # 2. to the meta device, training dtypes
        model.to("meta")
        for name, t in tensors_of(model).items():
            if t.is_floating_point():                  # frozen: `dtype`; trained (method, head, full): fp32
                trained = isinstance(t, torch.nn.Parameter) and t.requires_grad or name not in model.base_keys
                t.data = t.data.to(torch.float32 if trained else dtype)
    for block in blocks(model):                                       # 3. record the layout
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device=device)                                     # 4. allocate this process's chunks
    fill(model, sources, rank, world)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)                         # sum the processes' gradients,
            m.set_force_sum_reduction_for_comms(True)                 # as a plain sum (gloo has no PREMUL_SUM)
    return model


def tensors_of(model):
    """Every parameter and buffer (non-persistent ones included, e.g. LMAM's PE) by name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@torch.no_grad()
def fill(model, sources, rank, world):
    """Copy into each parameter's local chunk the rows it holds of its source tensor (a memory-mapped
    checkpoint tensor: only these rows are read), and every buffer whole (buffers are not sharded)."""
    for name, t in tensors_of(model).items():
        src = sources[name]
        if isinstance(t, DTensor):
            rows = chunk_rows(src.shape[0], world, rank)
            local(t).copy_(src[rows].to(t.dtype))
        else:
            t.copy_(src.to(t.dtype))


def frozen_bytes(model):
    """(bytes of the frozen parameters this process holds, bytes of all of them)."""
    mine = total = 0
    for p in model.parameters():
        if not p.requires_grad:
            mine += local(p).numel() * p.element_size()
            total += p.numel() * p.element_size()
    return mine, total


def frozen_bytes_per_process(model) -> list[dict]:
    """[{"held": bytes, "of": bytes}] of the frozen parameters, one entry per process (every
    process calls it): what sharding saves, for args.json."""
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, frozen_bytes(model))
    return [{"held": a, "of": b} for a, b in held]


# ----------------------------------------------------------------------------- what train.py calls

def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def micro_batch_share(rank: int, world: int, sharded: bool):
    """The function the training loop calls for this process's part of a step: share(micro) ->
    [(micro-batch, the weight of its loss)]. Data parallel, process k runs micro-batches k,
    k + world, ... of the step, weighted 1 (one process: all of them). Sharded, every forward
    gathers each block's weights from all processes, so every process must run as many forwards
    as the others: one short of micro-batches runs the step's first again, weighted 0 (no
    gradient, the same collectives)."""
    def share(micro):
        mine = [(part, 1.0) for part in micro[rank::world]]
        if sharded:
            mine += [(micro[0], 0.0)] * (math.ceil(len(micro) / world) - len(mine))
        return mine
    return share


def full_tensors(model, keys):
    """{key: the full tensor} for the given state-dict keys, on the CPU: a sharded model's gathered
    from every process (every process must call this: it runs collectives), a plain one's as they
    are."""
    state = model.state_dict()
    out = {}
    for k in keys:
        t = state[k]
        out[k] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
    return out


@torch.no_grad()
def load_full_tensors(model, tensors):
    """The inverse of full_tensors on --resume: each process of a sharded model takes its chunks,
    a plain model the tensors whole."""
    state = model.state_dict(keep_vars=True)
    for k, src in tensors.items():
        t = state[k]
        if isinstance(t, DTensor):
            src = src[chunk_rows(src.shape[0], dist.get_world_size(), dist.get_rank())]
        local(t).copy_(src.to(t.dtype))


def optimizer_state(model, optimizer):
    """AdamW's state: a sharded model's as full tensors keyed by parameter name (every process
    calls; all get it), a plain model's optimizer.state_dict()."""
    if not is_sharded(model):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state):
    """The inverse of optimizer_state on --resume."""
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
