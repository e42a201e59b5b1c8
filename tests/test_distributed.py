"""clq_triton.distributed across real processes (gloo on CPU)."""

import os
import socket
import time
from datetime import timedelta

import torch.multiprocessing as mp


def _rank(rank, port, calibrate_s, timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    import torch.distributed as dist

    from clq_triton import distributed

    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))  # shortened
    assert distributed.init_from_env()
    if distributed.is_main():
        time.sleep(calibrate_s)  # rank 0 calibrates and saves, far past the group's timeout
    distributed.barrier()
    dist.destroy_process_group()


def test_waiting_ranks_outlast_the_process_group_timeout():
    """clq-triton quantize under torchrun: ranks != 0 wait in barrier() while rank 0
    calibrates; with the process group's timeout shortened to 2 s, a 6 s calibration no
    longer times the waiting rank out (torchrun then killed rank 0 before it saved)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, 6.0, 2.0), nprocs=2, join=True)
