"""The training step as a CUDA graph (``GRAPH=True``): recorded once, replayed every step.

A replay launches the kernels of one whole step — both augmentations, forward, losses,
backward, optimizer step, confidence update, RECORDS' feature mean, the loss sums — at
once instead of one by one from Python. The measurements behind this choice, and why not
``torch.compile(mode="reduce-overhead")``, are in docs/decisions.md.

How (the whole-network capture of the PyTorch "CUDA Graphs" notes, torch 2.14):

- **Static inputs.** The batch's dataset indices are copied into one static index tensor
  before each replay; the uint8 images, candidates, confidences and labels already live on
  the device and the step gathers its batch from them. The batch size is fixed (drop_last).
- **Random numbers.** The trainer has one generator, re-seeded every epoch; it is
  registered with every graph (``CUDAGraph.register_generator_state``), so a replay draws
  from the generator's current offset and advances it: the numbers an eager step would
  draw.
- **Learning rate.** Fused SGD with the rate as a device tensor (``Trainer._optimizer``),
  filled in place each epoch: the cosine schedule needs no new capture.
- **Host decisions.** A step may branch on the epoch or step (CORR updates from epoch 1,
  SoLar's queue fills up): one graph per ``method.variant(epoch, step)``, captured when it
  first occurs. Numbers that change (SoLar's ramps, its queue position) are
  ``method.schedule(epoch, step)``: 0-dim device tensors, refilled before each replay.
- **Warm-up.** Each variant runs ``WARMUP`` eager steps on a side stream before its capture
  (ordinary training steps), so that everything created on first use exists beforehand:
  momentum buffers, cuBLAS/cuDNN workspaces, the augmentations' cached constants, the
  accumulators of the loss sums. A capture records without executing; the captured step
  is then replayed once to do its work.
- **Bindings.** A graph reads and writes fixed addresses. Pieces update their state in
  place; a step that rebinds a tensor while it is being captured is refused with the
  tensor's name, and when tensors moved between epochs (a stage with a fresh network, a
  resumed checkpoint) the graphs are dropped and captured again.

``tests/test_cuda_graph.py`` compares a replayed step with the eager step when a GPU is
present.
"""
from __future__ import annotations

from collections import Counter

import torch

WARMUP = 3   # eager steps of a variant before its capture


def scalar_tensor(value: float | int, device) -> torch.Tensor:
    """A scheduled number as the 0-dim tensor a replay reads: int64 for integers, float64
    otherwise (so that arithmetic with it rounds as with the Python number)."""
    return torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64,
                        device=device)


def bindings(trainer) -> dict[str, int]:
    """Address of every tensor a captured step reads or writes across steps, by name: the
    data, confidences, network, the method's modules and state, optimizer state and
    learning rate, and the loss-sum accumulators."""
    named = {"x": trainer.x, "cand": trainer.cand, "labels": trainer.labels,
             "conf": trainer.conf, "weight": trainer.weight}
    named.update((f"net.{k}", v) for k, v in trainer.net.state_dict().items())
    named.update((f"modules.{k}", v) for k, v in trainer.extra.state_dict().items())
    named.update((f"method.{k}", v) for k, v in trainer.method.state().items())
    named.update((f"sums.{k}", v) for k, v in trainer.sums.items())
    for i, group in enumerate(trainer.opt.param_groups):
        named[f"lr.{i}"] = group["lr"]
    for i, p in enumerate(trainer._parameters()):
        named.update((f"optim.{i}.{k}", v) for k, v in trainer.opt.state.get(p, {}).items())
    return {k: v.data_ptr() for k, v in named.items() if isinstance(v, torch.Tensor)}


class CapturedSteps:
    """The CUDA graphs of one trainer's steps, one per step variant (see the module notes).

    ``run(idx, gen, step_in_epoch)`` does what ``Trainer.step`` does and returns the loss
    terms (tensors that the next replay overwrites).
    """

    def __init__(self, trainer):
        if trainer.dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {trainer.dev.type!r}.")
        self.trainer = trainer
        self.idx = torch.zeros(trainer.cfg.batch_size, dtype=torch.long, device=trainer.dev)
        self.values: dict[str, torch.Tensor] = {}   # the schedule's numbers on the device
        self._last: dict[str, float | int] = {}
        self.side = torch.cuda.Stream(trainer.dev)
        self.captures = 0
        self.reset()

    def reset(self) -> None:
        """Forget every graph (they are captured again, after a new warm-up)."""
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.warm: Counter = Counter()
        self.bound: dict[str, int] = {}

    def valid(self, now: dict[str, int] | None = None) -> bool:
        """Whether every tensor the graphs recorded is still where they recorded it."""
        now = bindings(self.trainer) if now is None else now
        return all(now.get(k) == v for k, v in self.bound.items())

    def run(self, idx: torch.Tensor, gen: torch.Generator, step_in_epoch: int = 0) -> dict:
        tr = self.trainer
        if gen is not tr.gen:
            raise ValueError("CUDA-graph steps draw from the trainer's own generator "
                             "(trainer.epoch_generator(epoch)).")
        if step_in_epoch == 0 and self.graphs and not self.valid():
            self.reset()      # a fresh network or a resumed state since the capture
        epoch, step = tr.clock(step_in_epoch)
        key = (tr.stage.name, tr.method.variant(epoch, step))
        self._fill(tr.method.schedule(epoch, step))
        self.idx.copy_(idx)
        if key not in self.graphs:
            if self.warm[key] < WARMUP:
                self.warm[key] += 1
                return self._eager(gen, epoch, step)
            self.graphs[key] = self._capture(gen, epoch, step)
        graph, terms = self.graphs[key]
        graph.replay()
        return terms

    def _fill(self, values: dict[str, float | int]) -> None:
        """Write the step's scheduled numbers into their device tensors (when they change)."""
        for name, value in values.items():
            if name not in self.values:
                self.values[name] = scalar_tensor(value, self.trainer.dev)
            elif self._last[name] != value:
                self.values[name].fill_(value)
            self._last[name] = value

    def _eager(self, gen, epoch: int, step: int) -> dict:
        """A warm-up step: eager, on the side stream, from the static inputs."""
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            terms = self.trainer.compute_step(self.idx, gen, epoch, step, self.values)
        torch.cuda.current_stream().wait_stream(self.side)
        return terms

    def _capture(self, gen, epoch: int, step: int) -> tuple[torch.cuda.CUDAGraph, dict]:
        """Record one step (nothing runs: the caller replays it)."""
        before = bindings(self.trainer)
        if not self.valid(before):
            self.reset()
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(gen)
        with torch.cuda.graph(graph):
            terms = self.trainer.compute_step(self.idx, gen, epoch, step, self.values)
        after = bindings(self.trainer)
        moved = sorted(k for k in after if before.get(k) != after[k])
        if moved:
            raise RuntimeError(
                f"the training step of {self.trainer.cfg.method!r} rebinds or creates "
                f"{moved} while it is captured in a CUDA graph: create state tensors in "
                "init_state and update them in place (rules in rable_nb/methods/__init__.py).")
        self.bound.update(before)
        self.captures += 1
        return graph, terms
