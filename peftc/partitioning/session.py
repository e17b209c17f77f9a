"""One call through a partition, as each side runs it: forward stage by stage, backward in reverse.

Each stage runs on leaves: an input that requires grad enters the stage detached (a fresh leaf),
so backward can run one stage at a time, in the order the exchanges allow, and the gradient
reaching each leaf is handed back to whoever produced the value (an earlier stage of this
side, or the other side over the link). Base weights are frozen, so the base computes
gradients with respect to the activations it received and nothing else; user stages read the
adapter parameters in place, so their gradients accumulate on them as in the unsplit model.

`BaseSession` answers the user's messages (in process or from peftc.partitioning.distributed's
server); `UserSession` drives a call through a link.
"""

from __future__ import annotations

import torch

from peftc.partitioning.liveness import Liveness
from peftc.partitioning.program import Programs, Stage


class StageRunner:
    """Runs one side's stages over a table of values by node name and keeps what backward needs."""

    def __init__(self, stages: tuple[Stage, ...], values: dict, grad: bool):
        self.stages = stages
        self.values = values
        self.grad = grad
        self.tapes: dict[int, tuple[dict, dict]] = {}  # stage -> (input leaves, output values)
        self.grads: dict[str, torch.Tensor] = {}  # node name -> gradient accumulated so far

    def run(self, index: int) -> None:
        stage = self.stages[index]
        leaves, args = {}, []
        for name in stage.inputs:
            value = self.values.get(name)  # None: an input a pruned stage no longer reads
            if self.grad and isinstance(value, torch.Tensor) and value.requires_grad:
                value = leaves[name] = value.detach().requires_grad_()
            args.append(value)
        with torch.set_grad_enabled(self.grad):
            outputs = stage.module(*args)
        self.values.update(zip(stage.outputs, outputs))
        if self.grad:
            self.tapes[index] = (leaves, dict(zip(stage.outputs, outputs)))

    def add_grads(self, names, grads) -> None:
        for name, grad in zip(names, grads):
            if grad is not None:
                self.grads[name] = grad if name not in self.grads else self.grads[name] + grad

    def backward(self, index: int) -> None:
        leaves, outputs = self.tapes.pop(index, ({}, {}))
        roots, grads = [], []
        for name, value in outputs.items():
            grad = self.grads.pop(name, None)
            if grad is not None and isinstance(value, torch.Tensor) and value.requires_grad:
                roots.append(value)
                grads.append(grad)
        if roots:
            torch.autograd.backward(roots, grads)
        self.add_grads(leaves, [leaf.grad for leaf in leaves.values()])

    def take_grads(self, names) -> list:
        return [self.grads.pop(name, None) for name in names]


class BaseSession:
    """The base program's side of one call: stage 0 on the call's inputs, stage k+1 on exchange k's deltas."""

    def __init__(self, programs: Programs, flat_inputs: list, grad: bool, live: Liveness):
        self.programs = programs
        self.live = live
        self.runner = StageRunner(programs.base, dict(zip(programs.placeholders, flat_inputs)), grad)
        self.last = len(programs.cut.exchanges)

    def start(self) -> list:
        """Run base stage 0; the values exchange 0 sends (or the outputs, if nothing crosses)."""
        return self._run(0)

    def forward(self, index: int, received: list) -> list:
        """Take exchange `index`'s user values (zeros for sites killed), run the next base stage."""
        names = self.programs.cut.exchanges[index].to_base
        self.runner.values.update(zip(names, self.live.fill_dead(names, received, self.programs)))
        return self._run(index + 1)

    def _run(self, index: int) -> list:
        self.runner.run(index)
        if index == self.last:
            return [self.runner.values[n] if isinstance(n, str) else n for n in self.programs.outputs]
        names = self.programs.cut.exchanges[index].to_user
        return [self.runner.values[n] if self.live.needs(n) else None for n in names]

    def backward_start(self, output_grads: list) -> list:
        """Gradients of the outputs in; the gradients of the last exchange's user values out."""
        self.runner.add_grads([n for n in self.programs.outputs if isinstance(n, str)],
                              [g for n, g in zip(self.programs.outputs, output_grads) if isinstance(n, str)])
        return self._backward(self.last)

    def backward(self, index: int, grads: list) -> list:
        """Gradients of exchange `index`'s base values in; exchange index-1's user-value gradients out."""
        self.runner.add_grads(self.programs.cut.exchanges[index].to_user, grads)
        return self._backward(index)

    def _backward(self, index: int) -> list:
        self.runner.backward(index)
        return self.runner.take_grads(self.programs.cut.exchanges[index - 1].to_base)


class UserSession:
    """The user program's side of one call, driving the base through `link`."""

    def __init__(self, programs: Programs, link, live: Liveness):
        self.programs = programs
        self.link = link
        self.live = live
        self.runner = None

    def forward(self, flat_inputs: list, grad: bool) -> list:
        self.runner = StageRunner(self.live.user_stages(self.programs), {}, grad)
        received = self.link.call(flat_inputs, grad, self.live)
        for exchange in self.programs.cut.exchanges:
            self.runner.values.update(zip(exchange.to_user, received))
            self.runner.run(exchange.index)
            sent = [self.runner.values.get(n) if self.live.sends(n) else None for n in exchange.to_base]
            received = self.link.forward(exchange.index, sent)
        return received

    def backward(self, output_grads: list) -> None:
        grads = self.link.backward_start(output_grads)
        for exchange in reversed(self.programs.cut.exchanges):
            self.runner.add_grads(exchange.to_base, grads)
            self.runner.backward(exchange.index)
            sent = self.runner.take_grads(exchange.to_user)
            if exchange.index > 0:  # base stage 0 reads only the call's inputs: nothing to send it
                grads = self.link.backward(exchange.index, sent)
        self.runner = None
