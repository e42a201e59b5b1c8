"""Recording a transformer's forward inputs while a pipeline samples (calibration data)."""

from __future__ import annotations

import warnings
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


def spread(calls: int, samples: int) -> list[int]:
    """``samples`` call indices spread evenly over ``calls`` calls, first and last included
    (all of them when ``samples >= calls``)."""
    if samples >= calls:
        return list(range(calls))
    if samples == 1:
        return [0]
    return sorted({round(i * (calls - 1) / (samples - 1)) for i in range(samples)})


def capture_calibration(
    transformer: nn.Module,
    run: Callable[[], Any],
    every: int = 1,
    max_samples: int = 64,
    progress: bool = True,
    calls: int | None = None,
) -> CalibrationData:
    """Record the inputs of ``transformer`` while ``run()`` executes (e.g.
    ``lambda: pipe(prompts, num_inference_steps=20)``).

    Keeps every ``every``-th call (``every=1``: each sampler step) up to ``max_samples``
    calls, copied to CPU; the pipeline is stopped as soon as ``max_samples`` are held, which
    bounds memory. Call ``run`` with as many steps as the sampler you will use.
    ``calls``: how many times ``run()`` calls the transformer (e.g. the number of sampler
    steps); then the ``max_samples`` kept are spread evenly over all of them, first and last
    step included (``every`` is not used), so calibration sees every part of the schedule.
    """
    if every < 1 or max_samples < 1 or (calls is not None and calls < 1):
        raise ValueError("every, max_samples and calls must be >= 1")
    keep = set(spread(calls, max_samples)) if calls is not None else None
    want = len(keep) if keep is not None else max_samples
    data = CalibrationData()
    seen = 0
    bar = tqdm(total=want, desc="capture calibration inputs", disable=not progress)

    def hook(module, args, kwargs):
        nonlocal seen
        if (seen in keep) if keep is not None else seen % every == 0:
            data.samples.append((to_cpu(args), to_cpu(kwargs)))
            bar.update(1)
        seen += 1
        if len(data.samples) >= want:
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
    if keep is not None and len(data.samples) < want:
        warnings.warn(f"capture_calibration expected {calls} transformer calls but run() "
                      f"made {seen}: captured {len(data.samples)} of {want} samples",
                      stacklevel=2)
    return data
