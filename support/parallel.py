"""Several processes, one algorithm: torchrun's ranks and the few collectives train.py needs.

train.py under `torchrun --nproc_per_node N` runs N copies of the same loop. Every random draw of a step is a
function of (seed, step, image position), never of the rank, so the ranks only have to agree on three things:
- the rewards: every rank's are gathered in image order, so advantages use the statistics one process would
  (all_gather, in scoring.py);
- the gradient: each rank back-propagates its share of the step's mean loss, and the LoRA gradients are summed
  across ranks before clipping and the optimizer step (sum_gradients), so the update is one process's;
- the logged sums (all_reduce_).
Rank 0 alone writes (metrics, pictures, checkpoints). With one process every function here is a no-op. --device
cpu runs gloo ranks: the same code, tested without a GPU.

With --fsdp, `shard` also splits the frozen transformer's weights across the ranks (PyTorch's FSDP2, fully_shard per
block and the root), so each GPU holds 1/N of them; the LoRA stays whole on every rank, as above. The algorithm and
the checkpoints are unchanged: a sharded run resumes without --fsdp and the other way round.

    torchrun --nproc_per_node 2 train.py --images examples --pretrained_model_name_or_path tiny --device cpu ...
"""

import os
import sys

import torch
import torch.distributed as dist


def init_distributed(device):
    """torchrun starts one process per GPU and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; with --device
    cuda each rank runs on cuda:LOCAL_RANK (nccl), with --device cpu on the CPU (gloo). More ranks on a node than
    its GPUs: one line, every rank exits 2 before any rendezvous. Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if torch.device(device).type == "cuda" and torch.device(device).index is not None:
            torch.cuda.set_device(device)  # cuda:N: torch.cuda's memory figures read the current device
        return 0, 1, device
    local, cuda = int(os.environ["LOCAL_RANK"]), device.startswith("cuda")
    if cuda and int(os.environ["LOCAL_WORLD_SIZE"]) > torch.cuda.device_count():
        if local == 0:  # one line for the node, not one per rank
            print(
                f"error: {os.environ['LOCAL_WORLD_SIZE']} ranks on this node but {torch.cuda.device_count()} "
                f"GPU(s) visible: use --nproc_per_node {torch.cuda.device_count()} (or --device cpu for gloo ranks)",
                file=sys.stderr,
            )
        raise SystemExit(2)
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, f"cuda:{local}" if cuda else "cpu"


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_(tensors):
    """Sum tensors across ranks in place (one flat buffer, one collective); a no-op in one process."""
    if not dist.is_initialized():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_gradients(params):
    """Replace each parameter's gradient by the sum over ranks (a missing one counts as zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    all_reduce_(grads)
    for p, g in zip(params, grads):
        p.grad = g


def all_true(flag):
    """True only if `flag` is True on every rank (one collective), so the ranks take the same branch: with sharded
    weights every forward and backward is a collective, and a rank that skipped a backward would hang the others."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    all_reduce_([t])
    return t.item() == dist.get_world_size()


def sum_floats(values, device="cpu"):
    """{name: float} summed over ranks (float64, one collective; on `device`, which nccl needs to be a GPU)."""
    summed = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    all_reduce_([summed])
    return dict(zip(values, summed.tolist()))


# ----------------------------------------------------------------------------- the frozen weights sharded (--fsdp)
def check_fsdp(fsdp, world, quantize, compile):
    """--fsdp's combinations, refused at start-up with one line where they are not supported."""
    if not fsdp:
        return
    if quantize != "none":
        raise ValueError(
            f"--fsdp with --quantize {quantize}: the quantized weights do not shard (torchao's int8 "
            "weight-only tensor cannot, ao#2127; bitsandbytes' NF4 needs a bf16 quant storage this "
            "project does not use); use --fsdp alone (bf16) or --quantize alone"
        )
    if compile:
        raise ValueError("--fsdp with --compile: not yet tested together here; use one of them")
    if world < 2:
        raise ValueError(
            "--fsdp shards the frozen transformer across torchrun's ranks: run under "
            "torchrun --nproc_per_node N (N >= 2), or drop --fsdp"
        )


def in_turn(fn, turns=True):
    """fn() on each rank, one rank after another (turns=True), else on all at once. Loading a model for --fsdp: each
    rank holds the whole transformer in CPU memory until its shards are on its GPU, so a node holds one copy at a time
    instead of one per rank."""
    if not (turns and dist.is_initialized()):
        return fn()
    for turn in range(dist.get_world_size()):
        if turn == dist.get_rank():
            out = fn()
        dist.barrier()
    return out


def shard(transformer, lora_params, device):
    """FSDP2 over the ranks: fully_shard each transformer block, then the root (the layers outside the blocks).
    - Sharded: the frozen base weights, 1/N per rank (dim-0 shards), all-gathered for each block's forward and freed
      after it (reshard_after_forward), so a rank holds its shard plus the blocks in flight; the root's few weights
      stay gathered after the first forward (it would otherwise gather them twice per forward).
    - Not sharded: the LoRA (ignored_params). It stays fp32 and whole on every rank, so one FSDP group never mixes
      its fp32 with the base's bf16, its updates of ~1e-4 are not rounded to bf16, the optimizer and the
      checkpoints are those of an unsharded run, and sum_gradients sums its gradients as without sharding.
    - Prefetch: block i's forward starts the all-gather of block i+1 (and the backward block i-1's), so the
      transfer runs under the compute. Every forward then costs an all-gather of the frozen transformer: docs/
      performance.md has the estimate by link.
    Gradient checkpointing must be on before (diffusers calls the block through torch.utils.checkpoint, so the
    recomputation gathers again); the KL reference is the same module with the adapter off.
    The transformer may sit on the CPU: each block moves to `device` whole, then keeps only its shard there, so a GPU
    never holds the whole model. No collective runs here (in_turn may call it one rank at a time). Returns the bytes
    of the frozen weights, in all and on this rank."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh(torch.device(device).type, list(range(dist.get_world_size())))  # the world group's ranks
    ignored, blocks = set(lora_params), list(transformer.transformer_blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(transformer, mesh=mesh, reshard_after_forward=False, ignored_params=ignored)
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])
        following.set_modules_to_backward_prefetch([block])
    for p in lora_params:  # FSDP moves what it manages, not what it ignores
        p.data = p.data.to(device)
    frozen = [p for p in transformer.parameters() if not p.requires_grad]
    whole = sum(p.numel() * p.element_size() for p in frozen)
    local = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else 0 for p in frozen)
    return whole, local  # bytes of the frozen weights in all, and on this rank


def close():
    if dist.is_initialized():
        dist.destroy_process_group()
