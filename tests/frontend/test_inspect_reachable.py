"""peftc.inspect.reachable: bytes of the distinct storages an object keeps alive."""

from __future__ import annotations

import torch
from torch import nn

from peftc.inspect.reachable import reachable_storage_bytes


def test_a_storage_counts_once_through_views_containers_closures_and_gradients():
    weight = nn.Parameter(torch.zeros(8, 4))
    weight.grad = torch.zeros(8, 4)
    hidden = torch.zeros(16)

    def reads_hidden():
        return hidden

    holder = nn.Linear(4, 8, bias=False)
    holder.weight = weight
    roots = {"module": holder, "view": weight.detach().t(), "again": [weight], "hook": reads_hidden}
    assert reachable_storage_bytes(roots) == 2 * 8 * 4 * 4 + 16 * 4  # the weight, its grad, the closure's tensor


def test_meta_tensors_hold_no_storage_and_only_what_is_reachable_counts():
    alive_elsewhere = torch.zeros(1000)  # not reachable from the roots below: not counted
    assert reachable_storage_bytes({"meta": torch.empty(1000, device="meta")}) == 0
    assert reachable_storage_bytes([torch.zeros(3)]) == 12
    assert reachable_storage_bytes([alive_elsewhere[:10]]) == 4000  # a slice keeps its whole storage alive
