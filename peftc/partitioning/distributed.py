"""The two programs in separate processes, over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

Rank `base_rank` runs `serve_base(model)`: the frozen base, shared by every other rank. Each
user rank runs `connect(cm)`: its own adapters, data and optimizer; its calls and its
`loss.backward()` drive the base through the same sessions as the in-process partition
(peftc.partitioning.session), so the numbers are the same.

Messages (user -> base, control tag): HELLO (the spec, as JSON: data, never code), CALL (the
call's structure as JSON, its tensors, the killed sites, the schedule's fingerprint), BACKWARD,
CLOSE. The base answers HELLO and CALL with a status (an error travels back as text, never as
a hang), then every exchange is a header and a payload on the data tag (peftc.partitioning.wire).
The base builds its programs per (spec, call signature) from the tensors of the first call that
has it, exactly as the user does, and refuses a call whose schedule fingerprint differs.
"""

from __future__ import annotations

import json
from datetime import timedelta

import torch
import torch.distributed as dist

from peftc.capture.calls import CallSignature
from peftc.errors import LinkError, PartitionError
from peftc.partitioning.build import base_compilation, build_partition, flat_inputs
from peftc.partitioning.liveness import Liveness
from peftc.partitioning.program import Programs
from peftc.partitioning.session import BaseSession
from peftc.partitioning.wire import TO_BASE, TO_USER, Traffic, header_length, pack, payload_length, unpack

CONTROL, DATA = 1, 2
HELLO, CALL, BACKWARD, CLOSE = range(1, 5)
OK, FAILED = 0, 1


# -- the transport, both directions ------------------------------------------------------------------
def send_values(values: list, dst: int, traffic: Traffic | None = None, direction: str = "", phase: str = "",
                exchange: int | None = None) -> None:
    header, payload = pack(values)
    dist.send(header, dst, tag=DATA)
    if payload.numel():
        dist.send(payload, dst, tag=DATA)
    if traffic is not None:
        traffic.record(direction, phase, exchange, header, payload)


def recv_values(count: int, src: int, traffic: Traffic | None = None, direction: str = "", phase: str = "",
                exchange: int | None = None) -> list:
    header = torch.empty(header_length(count), dtype=torch.int64)
    dist.recv(header, src, tag=DATA)
    payload = torch.empty(payload_length(header), dtype=torch.uint8)
    if payload.numel():
        dist.recv(payload, src, tag=DATA)
    if traffic is not None:
        traffic.record(direction, phase, exchange, header, payload)
    return unpack(header, payload)


def send_text(text: str, dst: int) -> torch.Tensor:
    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.empty(0, dtype=torch.uint8)
    dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst, tag=DATA)
    if data.numel():
        dist.send(data, dst, tag=DATA)
    return data


def recv_text(src: int) -> str:
    length = torch.empty(1, dtype=torch.int64)
    dist.recv(length, src, tag=DATA)
    data = torch.empty(int(length), dtype=torch.uint8)
    if data.numel():
        dist.recv(data, src, tag=DATA)
    return bytes(data.tolist()).decode()


def send_status(dst: int, error: str | None) -> None:
    dist.send(torch.tensor([FAILED if error else OK], dtype=torch.int64), dst, tag=DATA)
    if error:
        send_text(error, dst)


def recv_status(src: int, what: str) -> None:
    status = torch.empty(1, dtype=torch.int64)
    dist.recv(status, src, tag=DATA)
    if int(status) != OK:
        raise LinkError(f"the base program (rank {src}) refused the {what}: {recv_text(src)}")


# -- call structure as JSON (data only) --------------------------------------------------------------
def encode_call(args: tuple, kwargs: dict) -> tuple[dict, list[torch.Tensor]]:
    tensors: list[torch.Tensor] = []

    def encode(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return {"tensor": len(tensors) - 1}
        if isinstance(value, tuple):
            return {"tuple": [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if isinstance(value, dict):
            return {"dict": {str(k): encode(v) for k, v in value.items()}}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise PartitionError(f"partition: a call argument of type {type(value).__name__} cannot travel to the "
                             "base program; pass tensors, numbers, strings, None, lists, tuples or dicts")

    return {"args": encode(tuple(args)), "kwargs": encode(dict(kwargs))}, tensors


def decode_call(structure: dict, tensors: list) -> tuple[tuple, dict]:
    def decode(value):
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            if "tensor" in value:
                return tensors[value["tensor"]]
            if "tuple" in value:
                return tuple(decode(v) for v in value["tuple"])
            return {k: decode(v) for k, v in value["dict"].items()}
        return value

    return decode(structure["args"]), decode(structure["kwargs"])


# -- the user's link -----------------------------------------------------------------------------------
class DistributedLink:
    """LocalLink's interface (peftc.partitioning.link) over the process group, to the base at `base_rank`."""

    def __init__(self, programs: Programs, traffic: Traffic, call: tuple[tuple, dict], base_rank: int):
        self.programs = programs
        self.traffic = traffic
        self.call_args = call
        self.base = base_rank
        self.last = len(programs.cut.exchanges)

    def call(self, flat_inputs: list, grad: bool, live: Liveness) -> list:
        structure, tensors = encode_call(*self.call_args)
        structure.update(grad=grad, dead=sorted(live.dead_sites), fingerprint=self.programs.fingerprint(),
                         count=len(tensors))
        dist.send(torch.tensor([CALL, 0, 0, 0], dtype=torch.int64), self.base, tag=CONTROL)
        sent = send_text(json.dumps(structure), self.base)
        self.traffic.record(TO_BASE, "call", None, torch.empty(4, dtype=torch.int64), sent)
        send_values(tensors, self.base, self.traffic, TO_BASE, "call")
        recv_status(self.base, "call")
        return self._receive(0)

    def _receive(self, index: int) -> list:
        if index == self.last:
            return recv_values(len(self.programs.outputs), self.base, self.traffic, TO_USER, "outputs")
        names = self.programs.cut.exchanges[index].to_user
        return recv_values(len(names), self.base, self.traffic, TO_USER, "forward", index)

    def forward(self, index: int, values: list) -> list:
        send_values(values, self.base, self.traffic, TO_BASE, "forward", index)
        return self._receive(index + 1)

    def backward_start(self, output_grads: list) -> list:
        dist.send(torch.tensor([BACKWARD, 0, 0, 0], dtype=torch.int64), self.base, tag=CONTROL)
        send_values(output_grads, self.base, self.traffic, TO_BASE, "output_grads")
        return self._receive_grads(self.last - 1)

    def backward(self, index: int, grads: list) -> list:
        send_values(grads, self.base, self.traffic, TO_BASE, "backward", index)
        return self._receive_grads(index - 1)

    def _receive_grads(self, index: int) -> list:
        names = self.programs.cut.exchanges[index].to_base
        return recv_values(len(names), self.base, self.traffic, TO_USER, "backward", index)


def hello(spec_dict: dict, base_rank: int) -> None:
    """Tell the base which spec this user's adapters follow (it builds its programs from it)."""
    dist.send(torch.tensor([HELLO, 0, 0, 0], dtype=torch.int64), base_rank, tag=CONTROL)
    send_text(json.dumps(spec_dict), base_rank)
    recv_status(base_rank, "spec")


def goodbye(base_rank: int) -> None:
    dist.send(torch.tensor([CLOSE, 0, 0, 0], dtype=torch.int64), base_rank, tag=CONTROL)


# -- the base server -----------------------------------------------------------------------------------
class BaseServer:
    """Serves the frozen base to every user rank until each has said CLOSE."""

    def __init__(self, model, users: list[int]):
        self.model = model
        self.open = set(users)
        self.compilations: dict[str, object] = {}  # spec JSON -> the Compilation its programs are built from
        self.spec_of: dict[int, str] = {}  # user rank -> spec JSON
        self.programs: dict[tuple[str, CallSignature], Programs] = {}
        self.sessions: dict[int, BaseSession] = {}
        self.traffic = {rank: Traffic() for rank in users}  # everything each user exchanged, as the base saw it
        self.calls = dict.fromkeys(users, 0)

    def serve(self) -> dict:
        while self.open:
            control = torch.empty(4, dtype=torch.int64)
            rank = dist.recv(control, None, tag=CONTROL)
            op = int(control[0])
            if rank not in self.traffic:
                raise LinkError(f"rank {rank} is not one of this base's users {sorted(self.traffic)}")
            if op == HELLO:
                self._hello(rank)
            elif op == CALL:
                self._call(rank)
            elif op == BACKWARD:
                self._backward(rank)
            elif op == CLOSE:
                self.open.discard(rank)
                self.sessions.pop(rank, None)
            else:
                raise LinkError(f"rank {rank} sent an unknown operation {op}")
        stats: dict = {rank: {"calls": self.calls[rank], **self.traffic[rank].to_dict()} for rank in self.traffic}
        stats["weight_gradients"] = self._weight_gradients()
        return stats

    def _weight_gradients(self) -> int:
        """How many base weights hold a gradient: 0, the base differentiates activations only."""
        weights = {id(p): p for programs in self.programs.values() for stage in programs.base
                   for p in stage.module.parameters()}
        return sum(p.grad is not None for p in weights.values())

    def _hello(self, rank: int) -> None:
        text = recv_text(rank)
        error = None
        try:
            key = json.dumps(json.loads(text), sort_keys=True)
            if key not in self.compilations:
                self.compilations[key] = base_compilation(self.model, json.loads(key))
            self.spec_of[rank] = key
        except Exception as err:  # noqa: BLE001 — the user hears why; the server keeps serving
            error = f"{type(err).__name__}: {err}"
        send_status(rank, error)

    def _call(self, rank: int) -> None:
        structure = json.loads(recv_text(rank))
        tensors = recv_values(structure["count"], rank, self.traffic[rank], TO_BASE, "call")
        try:
            programs, flat = self._programs_for(rank, structure, tensors)
        except Exception as err:  # noqa: BLE001
            send_status(rank, f"{type(err).__name__}: {err}")
            return
        send_status(rank, None)
        live = Liveness.bind(programs, frozenset(structure["dead"]))
        session = BaseSession(programs, flat, structure["grad"], live)
        self.sessions[rank] = session
        self.calls[rank] += 1
        traffic = self.traffic[rank]
        values = session.start()
        for exchange in programs.cut.exchanges:
            send_values(values, rank, traffic, TO_USER, "forward", exchange.index)
            received = recv_values(len(exchange.to_base), rank, traffic, TO_BASE, "forward", exchange.index)
            values = session.forward(exchange.index, received)
        send_values(values, rank, traffic, TO_USER, "outputs")
        if not structure["grad"]:
            self.sessions.pop(rank)

    def _programs_for(self, rank: int, structure: dict, tensors: list) -> tuple[Programs, list]:
        from_spec = self.spec_of.get(rank)
        if from_spec is None:
            raise LinkError("CALL before HELLO: connect() sends the spec first")
        args, kwargs = decode_call(structure, tensors)
        key = (from_spec, CallSignature.of(args, kwargs))
        if key not in self.programs:
            self.programs[key] = build_partition(self.compilations[from_spec], args, kwargs)
        programs = self.programs[key]
        if programs.fingerprint() != structure["fingerprint"]:
            raise PartitionError("the user's schedule differs from the base's for this call (fingerprint "
                                 f"{structure['fingerprint']} vs {programs.fingerprint()}): compile the same model "
                                 "config and spec on both sides")
        return programs, flat_inputs(programs, args, kwargs)

    def _backward(self, rank: int) -> None:
        session = self.sessions.pop(rank, None)
        if session is None:
            raise LinkError(f"rank {rank} asked for a backward with no forward in grad mode before it")
        traffic, exchanges = self.traffic[rank], session.programs.cut.exchanges
        grads = recv_values(len(session.programs.outputs), rank, traffic, TO_BASE, "output_grads")
        sent = session.backward_start(grads)  # the last exchange's delta gradients
        for exchange in reversed(exchanges[1:]):
            send_values(sent, rank, traffic, TO_USER, "backward", exchange.index)
            received = recv_values(len(exchange.to_user), rank, traffic, TO_BASE, "backward", exchange.index)
            sent = session.backward(exchange.index, received)  # exchange index-1's delta gradients
        send_values(sent, rank, traffic, TO_USER, "backward", 0)


def init_process_group(rank: int, world_size: int, port: int, timeout_s: float, backend: str = "gloo") -> None:
    """127.0.0.1:port rendezvous (what peftc.partitioning.launch uses; torchrun sets the env instead)."""
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
