"""What a training step costs besides its arithmetic: dispatched operations, reads back to
the host, and how busy the device is (the ``bench`` commands report these).

- :func:`count_ops`: the ATen operations one call dispatches (a proxy for CUDA kernel
  launches, countable on CPU) and how many of them read a tensor back to the host
  (``.item()``, ``float``/``bool`` of a tensor, ``nonzero``, boolean-mask indexing, a copy
  to the CPU). On CUDA each such read waits for the GPU; inside a CUDA-graph capture it is
  an error.
- :func:`busy_share`: ``torch.profiler`` over a few calls — on CUDA the summed GPU activity
  (kernels, copies, fills) per call, the kernels executed and the launches issued from the
  host; on CPU the summed time inside ATen operations (a CPU proxy: the rest of the wall
  time is Python and dispatch overhead).
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PACKAGE = Path(__file__).resolve().parent.parent  # rable_nb


def three_figures(x: float) -> float:
    """``x`` to three significant figures: a projection at any scale keeps its precision
    (rounding to fixed decimals turned a fast 4.248 s into 4.2)."""
    return float(f"{x:.3g}")


def reads_to_host(func, args, kwargs) -> bool:
    """Whether the ATen call ``func(*args, **kwargs)`` reads tensor data back to the host."""
    name = func.overloadpacket.__name__
    if name in ("_local_scalar_dense", "nonzero", "masked_select"):
        return True
    if name in ("index", "index_put", "index_put_"):
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    if name == "_to_copy" and kwargs.get("device") is not None:
        return torch.device(kwargs["device"]).type == "cpu" and args[0].device.type != "cpu"
    if name == "copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


def where_in_package() -> str:
    """'file:line' of the innermost frame in this package (where a read was asked for)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename).resolve()
        if PACKAGE in path.parents and path.name != "profiling.py":
            return f"{path.name}:{frame.lineno}"
    return "outside rable_nb"


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched inside ``with`` (views and bare allocations left
    out: they launch no kernel) and records every read back to the host as
    ``'op @ file:line'``. ``counting = False`` pauses both."""

    FREE = ("empty", "empty_like", "empty_strided", "scalar_tensor")

    def __init__(self):
        super().__init__()
        self.ops, self.host_reads, self.counting = 0, [], True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counting:
            self.ops += not (func.is_view or func.overloadpacket.__name__ in self.FREE)
            if reads_to_host(func, args, kwargs):
                self.host_reads.append(f"{func.overloadpacket.__name__} @ {where_in_package()}")
        return func(*args, **kwargs)


def count_ops(fn, *args, **kwargs) -> dict:
    """``{"ops": ..., "host_syncs": ...}`` of one call ``fn(*args, **kwargs)`` (see
    :class:`OpCounter`): the ops are a proxy for the number of CUDA kernel launches."""
    with OpCounter() as counter:
        fn(*args, **kwargs)
    return {"ops": counter.ops, "host_syncs": len(counter.host_reads)}


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")   # profiler activity types of GPU work


def busy_share(fn, calls: int, dev: torch.device, wall_s: float) -> dict:
    """Profile ``fn(i)`` for ``i < calls``; per call: busy time / ``wall_s`` (the call's
    wall time measured without the profiler, whose bookkeeping slows the host), and on
    CUDA the kernels executed and the launches (kernels, graphs) issued by the host.
    ``busy_share`` is None when the profiler recorded no GPU activity."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(dev)
    with profile(activities=activities) as prof:
        for i in range(calls):
            fn(i)
        synchronize(dev)
    events = prof.events()
    if not cuda:
        busy_us = sum(e.self_cpu_time_total for e in events
                      if e.device_type == DeviceType.CPU and not e.is_async)
        return {"busy_share": busy_us / 1e6 / calls / wall_s,
                "busy_measure": "CPU proxy: time inside ATen ops / wall time",
                "kernels_per_step": None, "launches_per_step": None}
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    if {getattr(e, "activity_type", None) for e in device} & set(GPU_WORK):
        device = [e for e in device if e.activity_type in GPU_WORK]   # no annotation ranges
    kernels = [e for e in device if getattr(e, "activity_type", "kernel") == "kernel"]
    launches = sum(e.device_type == DeviceType.CPU and e.name.startswith("cu")
                   and "Launch" in e.name for e in events)
    busy_us = sum(e.time_range.elapsed_us() for e in device)
    return {"busy_share": busy_us / 1e6 / calls / wall_s if device else None,
            "busy_measure": "GPU activity (kernels, copies, fills) / wall time",
            "kernels_per_step": len(kernels) / calls, "launches_per_step": launches / calls}


def timed(fn, calls: int, dev: torch.device, warmup: int = 1, best_of: int = 1) -> float:
    """Seconds per call of ``fn(i)`` (``i < calls``) after ``warmup`` calls of ``fn(calls)``;
    with ``best_of`` > 1 the fastest of that many timed loops (a noisy shared CPU)."""
    for _ in range(warmup):
        fn(calls)
    best = float("inf")
    for _ in range(best_of):
        synchronize(dev)
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        synchronize(dev)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best
