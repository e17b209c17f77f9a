"""LocalLink: the base program in this process, every transfer packed, counted and unpacked.

It is the reference the two-process link (peftc.partitioning.distributed) is checked against: the
same sessions, the same wire format, the same byte counts; only the transport differs.
"""

from __future__ import annotations

from peftc.partitioning.liveness import Liveness
from peftc.partitioning.program import Programs
from peftc.partitioning.session import BaseSession
from peftc.partitioning.wire import TO_BASE, TO_USER, Traffic, pack, unpack


class LocalLink:
    def __init__(self, programs: Programs, traffic: Traffic):
        self.programs = programs
        self.traffic = traffic
        self.session: BaseSession | None = None
        self.last = len(programs.cut.exchanges)

    def _cross(self, direction: str, phase: str, exchange: int | None, values: list) -> list:
        header, payload = pack(values)
        self.traffic.record(direction, phase, exchange, header, payload)
        return unpack(header, payload)

    def call(self, flat_inputs: list, grad: bool, live: Liveness) -> list:
        inputs = self._cross(TO_BASE, "call", None, flat_inputs)
        self.session = BaseSession(self.programs, inputs, grad, live)
        return self._to_user(0, self.session.start())

    def forward(self, index: int, values: list) -> list:
        received = self._cross(TO_BASE, "forward", index, values)
        return self._to_user(index + 1, self.session.forward(index, received))

    def _to_user(self, index: int, values: list) -> list:
        if index == self.last:
            return self._cross(TO_USER, "outputs", None, values)
        return self._cross(TO_USER, "forward", index, values)

    def backward_start(self, output_grads: list) -> list:
        grads = self._cross(TO_BASE, "output_grads", None, output_grads)
        return self._cross(TO_USER, "backward", self.last - 1, self.session.backward_start(grads))

    def backward(self, index: int, grads: list) -> list:
        received = self._cross(TO_BASE, "backward", index, grads)
        return self._cross(TO_USER, "backward", index - 1, self.session.backward(index, received))
