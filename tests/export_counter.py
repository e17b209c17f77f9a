"""counted_exports(): the torch.export.export calls made inside a block (a build that reuses a capture makes none)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch


@contextlib.contextmanager
def counted_exports() -> Iterator[list]:
    """Yields a list that gets the module of each torch.export.export call made inside the block."""
    calls = []
    real = torch.export.export

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    with mock.patch.object(torch.export, "export", counting):
        yield calls
