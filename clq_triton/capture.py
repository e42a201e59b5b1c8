"""Recording a transformer's forward inputs while a pipeline samples (calibration data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples / lists / dicts."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device) -> Any:
    return map_tensors(obj, lambda t: t.to(device))


def to_cpu(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().to("cpu", copy=True))


@dataclass
class CalibrationData:
    """Recorded calls of a transformer: ``samples[i] = (args, kwargs)``, tensors on CPU.

    Replaying a sample is ``model(*args, **kwargs)``; each sample is one sampler step of one
    batch of prompts / labels, so the set spans the sampler's timesteps.
    """

    samples: list[tuple[tuple, dict]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def from_inputs(cls, inputs: list[dict]) -> "CalibrationData":
        """From keyword-argument dicts, e.g. ``[dict(hidden_states=..., timestep=...)]``."""
        return cls([((), to_cpu(dict(kw))) for kw in inputs])


class _Enough(Exception):
    """Raised inside the hook to stop the pipeline once enough samples are recorded."""


def capture_calibration(
    transformer: nn.Module,
    run: Callable[[], Any],
    every: int = 1,
    max_samples: int = 64,
    progress: bool = True,
) -> CalibrationData:
    """Record the inputs of ``transformer`` while ``run()`` executes (e.g.
    ``lambda: pipe(prompts, num_inference_steps=20)``).

    Keeps every ``every``-th call (``every=1``: each sampler step) up to ``max_samples``
    calls, copied to CPU; the pipeline is stopped as soon as ``max_samples`` are held, which
    bounds memory. Call ``run`` with as many steps as the sampler you will use.
    """
    if every < 1 or max_samples < 1:
        raise ValueError("every and max_samples must be >= 1")
    data = CalibrationData()
    seen = 0
    bar = tqdm(total=max_samples, desc="capture calibration inputs", disable=not progress)

    def hook(module, args, kwargs):
        nonlocal seen
        if seen % every == 0:
            data.samples.append((to_cpu(args), to_cpu(kwargs)))
            bar.update(1)
        seen += 1
        if len(data.samples) >= max_samples:
            raise _Enough

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    except _Enough:
        pass
    finally:
        handle.remove()
        bar.close()
    if not data.samples:
        raise RuntimeError("run() never called the transformer: nothing was captured")
    return data
