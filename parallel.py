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
            print(f"error: {os.environ['LOCAL_WORLD_SIZE']} ranks on this node but {torch.cuda.device_count()} "
                  f"GPU(s) visible: use --nproc_per_node {torch.cuda.device_count()} (or --device cpu for gloo ranks)",
                  file=sys.stderr)
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


def sum_gradients(params, finite):
    """Replace each parameter's gradient by the sum over ranks (a missing one counts as zeros). Returns True only
    if every rank's loss was finite (`finite` is this rank's), so all ranks skip or take the step together."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flag = torch.tensor([float(finite)], device=grads[0].device)
    all_reduce_(grads + [flag])
    for p, g in zip(params, grads):
        p.grad = g
    return flag.item() == world_size()


def sum_floats(values, device="cpu"):
    """{name: float} summed over ranks (float64, one collective; on `device`, which nccl needs to be a GPU)."""
    summed = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    all_reduce_([summed])
    return dict(zip(values, summed.tolist()))


def close():
    if dist.is_initialized():
        dist.destroy_process_group()
