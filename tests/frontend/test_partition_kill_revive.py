"""Kill and Revive on a partition (issue 18 item 4): small updates switch a site off, a schedule brings it back."""

from __future__ import annotations

import pytest
import torch
from partition_ranks import ALL_FIVE, Q_V, TinyLM, batch, compiled

import peftc
from peftc.errors import PartitionError
from peftc.partitioning.kill_revive import KillRevive


def train(part, cm, steps, kill_revive=None, seed=0):
    optimizer = torch.optim.SGD(cm.adapter_root.parameters(), lr=0.1)
    losses, traffic = [], []
    for step in range(steps):
        loss, _ = part(*batch(seed + step))
        loss.backward()
        optimizer.step()
        if kill_revive is not None:
            kill_revive.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        traffic.append(part.traffic().to_dict()["lower_bound"])
    return losses, traffic


def test_with_kill_revive_off_training_is_bit_identical_to_the_partition_without_it():
    plain_cm, off_cm = compiled(Q_V, seed=1), compiled(Q_V, seed=1)
    plain = peftc.partition(plain_cm)
    never = KillRevive(threshold=0.0, patience=1)
    off = peftc.partition(off_cm, kill_revive=never)
    losses_plain, _ = train(plain, plain_cm, 3)
    losses_off, _ = train(off, off_cm, 3, never)
    assert all(torch.equal(a, b) for a, b in zip(losses_plain, losses_off))
    for a, b in zip(plain_cm.adapter_root.parameters(), off_cm.adapter_root.parameters()):
        assert torch.equal(a, b)
    assert not never.dead_sites and "active sites: 4 of 4" in str(off.report())
    x, y = batch(9)
    assert torch.equal(off(x, y)[1], off_cm(x, y)[1])  # and the forward is the unpartitioned model's, bit for bit


def test_sites_whose_updates_stay_small_are_killed_skip_their_exchange_and_revive_on_schedule():
    cm = compiled(ALL_FIVE, seed=2)
    kr = KillRevive(threshold=10.0, patience=1, revive_every=2)  # every update is "small": all die after one step
    part = peftc.partition(cm, kill_revive=kr)
    assert len(kr.watched) == 10
    _, traffic = train(part, cm, 1, kr)
    assert traffic[0]["to_user"] > 0 and kr.dead_sites == frozenset(kr.watched)
    x, y = batch(7)
    loss, logits = part(x, y)
    with torch.no_grad():
        _, base_logits = TinyLM()(x, y)
    assert torch.equal(logits, base_logits)  # every delta dropped: exactly the base model
    assert part.traffic().to_dict()["lower_bound"] == {"to_base": 0, "to_user": 0}  # headers only
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in cm.adapter_root.parameters())
    assert "active sites: 0 of 10; killed: layers.0.down_proj" in str(part.report())
    kr.step()
    kr.step()  # revive_every=2 steps after the kill
    assert not kr.dead_sites and all(p.requires_grad for p in cm.adapter_root.parameters())
    assert [e[1] for e in kr.events].count("revive") == 10


def test_a_killed_site_stops_its_input_only_when_no_live_site_needs_it():
    cm = compiled(Q_V, seed=3)
    kr = KillRevive(threshold=0.5)
    part = peftc.partition(cm, kill_revive=kr)
    x, y = batch(1)
    part(x, y)
    full = part.traffic().to_dict()["lower_bound"]
    kr.dead_sites = frozenset({"layers.0.v_proj"})  # v killed, q alive: q still needs the normed input
    part(x, y)
    one = part.traffic().to_dict()["lower_bound"]
    assert one["to_user"] == full["to_user"] and one["to_base"] == full["to_base"] - 14 * 32 * 4
    kr.dead_sites = frozenset({"layers.0.v_proj", "layers.0.q_proj"})
    part(x, y)
    both = part.traffic().to_dict()["lower_bound"]
    assert both["to_user"] == full["to_user"] - 14 * 32 * 4 and both["to_base"] == full["to_base"] - 2 * 14 * 32 * 4


def test_kill_revive_settings_are_checked():
    with pytest.raises(PartitionError, match="patience >= 1"):
        KillRevive(patience=0)
