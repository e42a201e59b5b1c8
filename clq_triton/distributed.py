"""Calibration capture spread over processes with torch.distributed (``torchrun`` or
``accelerate launch``; without a process group everything runs in this process).

Capturing means running the full-precision pipeline for every calibration prompt × sampler
step, the slow part on a real model. :func:`capture_sharded` deals prompt batches over the
ranks and gathers the samples on every rank in batch order, so the calibration data (and the
checkpoint calibrated from it) are the same for any number of processes. One rank then
calibrates and saves (:func:`is_main`), the others wait (:func:`barrier`, without the
process group's timeout) and load.
"""

from __future__ import annotations

import os
from datetime import timedelta
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


WAIT_TIMEOUT = timedelta(days=7)  # how long :func:`barrier` waits
_wait_group = None  # a gloo group with WAIT_TIMEOUT, made by init_from_env


def barrier() -> None:
    """Wait for every rank, however long the slowest takes (no-op without a process group):
    ranks that wait here while rank 0 calibrates must not time out under the process
    group's own timeout (NCCL 10 min, gloo 30 min). Waits in the gloo group of
    :func:`init_from_env`, whose timeout is :data:`WAIT_TIMEOUT`; a launcher stops the
    waiting ranks if rank 0 fails."""
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier(group=_wait_group)


def init_from_env() -> bool:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1 in the environment, as
    torchrun and accelerate launch set it): gloo on CPU, nccl with CUDA (each rank on GPU
    ``LOCAL_RANK``; a group already joined is kept), and the long-waiting group of
    :func:`barrier`. Returns whether this is a run of several processes."""
    import torch.distributed as dist

    global _wait_group
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if _wait_group is None:  # collective: every rank makes it here, at the same time
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
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
