"""Calibration capture spread over processes with torch.distributed (``torchrun`` or
``accelerate launch``; without a process group everything runs in this process).

Capturing means running the full-precision pipeline for every calibration prompt × sampler
step, the slow part on a real model. :func:`capture_sharded` deals prompt batches over the
ranks and gathers the samples on every rank in batch order, so the calibration data (and the
checkpoint calibrated from it) are the same for any number of processes. One rank then
calibrates and saves (:func:`is_main`), the others wait (:func:`barrier`) and load.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from .capture import CalibrationData, capture_calibration


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def init_from_env() -> bool:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1 in the environment, as
    torchrun and accelerate launch set it): gloo on CPU, nccl with CUDA (each rank on GPU
    ``LOCAL_RANK``). Returns whether this is a run of several processes."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def capture_sharded(transformer: torch.nn.Module, run: Callable[[Any], Any],
                    batches: Sequence[Any], **capture_kw) -> CalibrationData:
    """Calibration samples of ``run(batch)`` (e.g. the pipeline on a list of prompts) for every
    batch: batch i is captured by rank i mod world (:func:`capture_calibration` with
    ``capture_kw``, e.g. ``max_samples``, ``calls``), and every rank gets all samples in batch
    order — the same CalibrationData whatever the number of processes."""
    rank, world = rank_and_world()
    mine = {i: capture_calibration(transformer, lambda b=b: run(b), **capture_kw).samples
            for i, b in enumerate(batches) if i % world == rank}
    if world > 1:
        import torch.distributed as dist

        parts: list[dict] = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {i: samples for part in parts for i, samples in part.items()}
    return CalibrationData([s for i in range(len(batches)) for s in mine[i]])
