"""Data-parallel training under ``torchrun``: NCCL on GPUs, gloo on CPUs.

Each rank takes its slice of the global batch (``TrainConfig.batch_size`` is the combined batch), so N
ranks follow the single-process run with the same batch size up to floating-point reduction order.
Gradients are averaged with one all-reduce per network after each backward (this works whatever the
call pattern of ``encode`` / ``decode``), and batch norm statistics are computed over the combined batch:
``SyncBatchNorm`` on GPUs, :class:`CrossRankBatchNorm2d` on CPUs (SyncBatchNorm is GPU-only).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from models.device import pick_device

log = logging.getLogger(__name__)


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init(device_name: str) -> tuple[torch.device, int, int]:
    """Start the process group if launched by torchrun; returns (device, rank, world size)."""
    rank, size, local = world()
    device = pick_device(device_name)
    if device.type == "cuda" and device.index is None:  # one GPU per torchrun process
        device = torch.device("cuda", local)
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d on %s (%s)", rank, size, device, backend)
    return device, rank, size


def shutdown() -> None:
    """End the process group that :func:`init` started, if any. Left to the interpreter's exit, a gloo
    rank once aborted after its last step ("terminate called without an active exception", SIGABRT;
    tests/test_distributed.py in a clean-clone CI run) and torchrun reported the run as failed."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all ranks (differentiable all-reduce), for CPUs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat(
            [
                xf.sum(dim=(0, 2, 3)),
                xf.square().sum(dim=(0, 2, 3)),
                torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device),
            ]
        )
        total = dist_fn.all_reduce(local)
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap every BatchNorm2d for its cross-rank version (state-dict keys unchanged)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CrossRankBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.load_state_dict(child.state_dict())
            new.to(child.weight.device if child.affine else device)
            setattr(module, name, new)
        else:
            convert_batchnorm(child, device)
    return module


def average_gradients(module: nn.Module) -> None:
    """All-reduce and average the gradients of ``module`` in one flat buffer.

    Why not ``DistributedDataParallel``: DDP reduces the gradients of the work that went through its
    wrapper's ``forward``, once per backward. A GAN step here does not fit that: the generator step
    calls ``G.encode`` / ``G.decode`` / ``G.decode_parts`` (the served model's split, so the encoder
    runs once for the edit and the reconstruction) rather than ``forward``; D runs twice before its
    backward (real and fake batch) and once more, frozen, inside G's step; and R1 / WGAN-GP take
    ``autograd.grad(..., create_graph=True)`` of D, a double backward that DDP does not support. One
    explicit all-reduce per network after each backward is what DDP would do, without those limits;
    ``tests/test_distributed.py`` checks that two ranks follow the single-process run.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(module: nn.Module) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def check_in_sync(module: nn.Module) -> float:
    """Max over ranks of |param checksum - rank 0's|; raises if the ranks have drifted apart."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return 0.0
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    spread = float(max((g - gathered[0]).abs().item() for g in gathered))
    if spread != 0.0:
        raise RuntimeError(f"ranks drifted apart: parameter checksums differ by {spread}")
    return spread
