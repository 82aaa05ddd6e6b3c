"""One run across several GPUs or machines with torchrun (docs/multi_gpu.md).

    torchrun --nproc_per_node=4 train.py --dataset cifar10 --labels-per-class 4 --loss entropy

Every rank draws the same global index stream and the same augmentation parameters (same
generator seeds), augments the whole global batch and keeps its own slice of each view (the
augmentation is a few per cent of a step, so doing it N times costs little and makes the ranks
together see exactly the single-process batch). After the forward pass the outputs of all ranks
are all-gathered *with gradient* and put back in single-process order, so every rank computes the
loss, the pseudo-labels and the statistics of the global batch, exactly the single-GPU formulas.

Gradient arithmetic: every rank computes the same global loss L. all_gather's backward sums the
gradient of each rank's copy of L, so a rank's local rows receive N dL/dz; DDP then averages the
parameter gradients over the N ranks: (1/N) sum_r N dL/dtheta_r = dL/dtheta, the single-process
gradient (tested on CPU with gloo).
"""
import ctypes
import os
import signal
import sys
import warnings

import torch
import torch.distributed as dist


def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (torchrun's launcher) dies, so that a
    kill -9 of the launcher does not leave ranks training and writing on their own. If the
    parent died before that took effect, exit now. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the prctl took effect
        os._exit(1)


def init(device_type: str) -> None:
    """nccl between GPUs, gloo on CPU; the address comes from torchrun's environment. The
    process dies with its launcher (die_with_parent)."""
    die_with_parent()
    # the differentiable all_gather that gather_views needs is marked deprecated in favour of a
    # private API; the warning would be printed by every rank at every step's first call
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather",
                            category=FutureWarning)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def close() -> None:
    """At the end of a run, on every rank: wait for the others, then tear the process group down.
    A rank that exits with the group alive can abort in the interpreter's teardown (gloo's
    threads are destroyed unjoined: "terminate called without an active exception", SIGABRT),
    and torchrun then reports a finished run as failed. Without a process group: nothing."""
    if dist.is_initialized():
        dist.barrier()  # rank 0 evaluates and writes last; nobody leaves before it is done
        dist.destroy_process_group()


def local_views(views: list[torch.Tensor], rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's contiguous slice of each view of the global batch."""
    return [v[rank * len(v) // world_size:(rank + 1) * len(v) // world_size] for v in views]


def gather_views(t: torch.Tensor | None, sizes: list[int], world_size: int) -> torch.Tensor | None:
    """t holds this rank's rows [view 0 slice; view 1 slice; ...]; returns the global rows
    [view 0; view 1; ...] of all ranks, in single-process order, differentiable."""
    if t is None or world_size == 1:
        return t
    from torch.distributed.nn.functional import all_gather
    per_rank = [p.split([s // world_size for s in sizes]) for p in all_gather(t.contiguous())]
    return torch.cat([torch.cat([chunks[j] for chunks in per_rank]) for j in range(len(sizes))])
