"""How a list of values crosses between the programs: one int64 header, one byte payload.

Every transfer carries a known number of values (the schedule says which), so the header has a
fixed length: SLOT words per value (kind, dtype, rank, up to MAX_RANK sizes; a Python scalar
keeps its bits in the first size). The payload is the tensors' bytes back to back, one message
whatever the number of tensors. `Traffic` counts both, per direction and per exchange; the
payload alone is the lower bound the cut tensors set.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

from peftc.errors import LinkError

MAX_RANK = 8
SLOT = 3 + MAX_RANK
ABSENT, TENSOR, TENSOR_GRAD, INT, NONE, FLOAT, BOOL = range(7)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool)
TO_BASE, TO_USER = "to_base", "to_user"


def header_length(count: int) -> int:
    return SLOT * count


def pack(values: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(header int64 [SLOT * len(values)], payload uint8 [bytes]) for tensors, None, ints, floats, bools;
    a value of None in a gradient list means "no gradient" and travels as ABSENT."""
    header = torch.zeros(header_length(len(values)), dtype=torch.int64)
    chunks = []
    for i, value in enumerate(values):
        slot = header[i * SLOT:(i + 1) * SLOT]
        if isinstance(value, torch.Tensor):
            if value.dtype not in DTYPES or value.dim() > MAX_RANK:
                raise LinkError(f"cannot send a {value.dtype} tensor of rank {value.dim()} (supported: "
                                f"{[str(d) for d in DTYPES]}, rank <= {MAX_RANK})")
            slot[0] = TENSOR_GRAD if value.requires_grad else TENSOR
            slot[1] = DTYPES.index(value.dtype)
            slot[2] = value.dim()
            slot[3:3 + value.dim()] = torch.tensor(value.shape, dtype=torch.int64)
            chunks.append(value.detach().contiguous().reshape(-1).view(torch.uint8))
        elif value is None:
            slot[0] = ABSENT
        else:
            slot[0], slot[3] = _scalar(value)
    payload = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
    return header, payload


def _scalar(value) -> tuple[int, int]:
    if isinstance(value, bool):
        return BOOL, int(value)
    if isinstance(value, int):
        return INT, value
    if isinstance(value, float):
        return FLOAT, struct.unpack("<q", struct.pack("<d", value))[0]
    raise LinkError(f"cannot send a value of type {type(value).__name__} between the base and user programs "
                    "(tensors, None, int, float and bool cross)")


def payload_length(header: torch.Tensor) -> int:
    total = 0
    for slot in header.view(-1, SLOT).tolist():
        if slot[0] in (TENSOR, TENSOR_GRAD):
            numel = 1
            for size in slot[3:3 + slot[2]]:
                numel *= size
            total += numel * _itemsize(DTYPES[slot[1]])
    return total


def unpack(header: torch.Tensor, payload: torch.Tensor) -> list:
    """The values `pack` took: fresh tensors (requires_grad as sent), scalars, None for ABSENT."""
    values, offset = [], 0
    for slot in header.view(-1, SLOT).tolist():
        kind = slot[0]
        if kind in (TENSOR, TENSOR_GRAD):
            dtype, shape = DTYPES[slot[1]], slot[3:3 + slot[2]]
            numel = 1
            for size in shape:
                numel *= size
            nbytes = numel * _itemsize(dtype)
            tensor = payload[offset:offset + nbytes].clone().view(dtype).reshape(shape)
            offset += nbytes
            values.append(tensor.requires_grad_(kind == TENSOR_GRAD))
        elif kind == INT:
            values.append(slot[3])
        elif kind == BOOL:
            values.append(bool(slot[3]))
        elif kind == FLOAT:
            values.append(struct.unpack("<d", struct.pack("<q", slot[3]))[0])
        else:
            values.append(None)
    return values


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Transfer:
    direction: str  # TO_BASE | TO_USER
    phase: str  # "call" | "forward" | "backward" | "outputs"
    exchange: int | None
    header_bytes: int
    payload_bytes: int


@dataclass
class Traffic:
    """What crossed in one call (forward, and its backward once it ran), measured at the link."""

    transfers: list[Transfer] = field(default_factory=list)
    tokens: int = 0  # tokens in the call (batch x sequence), for per-token figures

    def record(self, direction: str, phase: str, exchange: int | None, header: torch.Tensor,
               payload: torch.Tensor) -> None:
        self.transfers.append(Transfer(direction, phase, exchange, header.numel() * header.element_size(),
                                       payload.numel()))

    def bytes(self, direction: str | None = None, phases: tuple[str, ...] | None = None,
              payload_only: bool = False) -> int:
        return sum(t.payload_bytes + (0 if payload_only else t.header_bytes) for t in self.transfers
                   if (direction is None or t.direction == direction) and (phases is None or t.phase in phases))

    @property
    def to_base(self) -> int:
        return self.bytes(TO_BASE)

    @property
    def to_user(self) -> int:
        return self.bytes(TO_USER)

    @property
    def messages(self) -> int:
        """Messages on the wire: a header and, when it has bytes, a payload per transfer."""
        return sum(1 + (t.payload_bytes > 0) for t in self.transfers)

    def to_dict(self) -> dict:
        activations = ("forward", "backward")
        return {
            "to_base": self.to_base, "to_user": self.to_user, "messages": self.messages, "tokens": self.tokens,
            "activations": {d: self.bytes(d, activations) for d in (TO_BASE, TO_USER)},
            "lower_bound": {d: self.bytes(d, activations, payload_only=True) for d in (TO_BASE, TO_USER)},
            "call_io": {d: self.bytes(d, ("call", "outputs", "output_grads")) for d in (TO_BASE, TO_USER)},
        }

    def __str__(self) -> str:
        d = self.to_dict()
        return (f"to base {d['to_base']:,} B, to user {d['to_user']:,} B in {d['messages']} messages; "
                f"activations {sum(d['activations'].values()):,} B (lower bound {sum(d['lower_bound'].values()):,} B), "
                f"call inputs/outputs {sum(d['call_io'].values()):,} B")
