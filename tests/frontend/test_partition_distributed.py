"""The partition over torch.distributed (issue 18 item 2): one base process serving two user processes.

The processes are spawned here (gloo on 127.0.0.1), joined by a deadline and terminated if late.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from partition_ranks import ALL_FIVE, Q_V, TinyLM, batch, compiled, serve, train_steps, user

import peftc
from peftc.errors import LinkError
from peftc.partitioning.build import base_compilation
from peftc.partitioning.distributed import BaseServer, decode_call, encode_call
from peftc.partitioning.launch import run_ranks

STEPS = 2


@pytest.fixture(scope="module")
def ranks():
    return run_ranks([serve, user, user], ([Q_V, ALL_FIVE], [1, 2], STEPS), timeout_s=170)


@pytest.mark.parametrize("rank, spec, seed", [(1, Q_V, 1), (2, ALL_FIVE, 2)])
def test_each_user_trains_as_the_single_process_model_does(ranks, rank, spec, seed):
    got = ranks[rank]
    cm = compiled(spec, seed)
    expected = train_steps(cm, list(cm.adapter_root.parameters()), seed, STEPS)
    np.testing.assert_array_equal(got["logits"], expected["logits"])
    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5, atol=1e-5)
    for a, b in zip(got["grads"], expected["grads"]):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got["params"], expected["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert got["user_params"] == sum(p.numel() for p in cm.adapter_root.parameters())


def test_traffic_over_the_wire_is_what_the_in_process_partition_measures(ranks):
    cm = compiled(Q_V, 1)
    part = peftc.partition(cm)
    loss, _ = part(*batch(1))
    loss.backward()
    local = part.traffic().to_dict()
    remote = ranks[1]["traffic"][0]
    assert remote["activations"] == local["activations"] and remote["lower_bound"] == local["lower_bound"]
    # the base counted the same bytes for each user, and the two users' adapters cost differently
    served = ranks[0]
    assert served["weight_gradients"] == 0  # the base never computed a weight gradient
    for rank in (1, 2):
        assert served[rank]["calls"] == STEPS
        sent = sum(t["activations"]["to_user"] for t in ranks[rank]["traffic"])
        assert served[rank]["activations"]["to_user"] == sent
    assert served[2]["lower_bound"]["to_user"] > served[1]["lower_bound"]["to_user"]


def test_a_call_travels_as_json_and_tensors_and_comes_back_the_same():
    x = torch.arange(6).view(2, 3)
    structure, tensors = encode_call((x, (1, None)), {"flag": True, "opts": {"k": [2.5, "s"]}})
    args, kwargs = decode_call(structure, tensors)
    assert args[0] is x and args[1] == (1, None) and kwargs == {"flag": True, "opts": {"k": [2.5, "s"]}}
    with pytest.raises(peftc.PartitionError, match="cannot travel to the base program"):
        encode_call((object(),), {})


def fail(rank, *_):
    raise RuntimeError(f"rank {rank} gave up")


def wait(rank, *_):
    torch.distributed.barrier()


def test_a_failing_rank_is_reported_and_the_others_are_terminated():
    with pytest.raises(LinkError, match="rank 1 failed"):
        run_ranks([wait, fail], timeout_s=60)


def test_the_base_refuses_a_call_before_the_spec_or_with_another_schedule():
    server = BaseServer(TinyLM(), users=[1])
    structure, tensors = encode_call(batch(0), {})
    structure.update(fingerprint="0" * 16)
    with pytest.raises(LinkError, match="CALL before HELLO"):
        server._programs_for(1, structure, tensors)
    server.spec_of[1] = json.dumps(Q_V, sort_keys=True)
    server.compilations[server.spec_of[1]] = base_compilation(server.model, Q_V)
    with pytest.raises(peftc.PartitionError, match="schedule differs.*compile the same model config and spec"):
        server._programs_for(1, structure, tensors)
    structure.update(fingerprint=peftc.partition(compiled(Q_V, 1)).first.fingerprint())
    programs, flat = server._programs_for(1, structure, tensors)  # the same schedule: accepted
    assert len(flat) == 2 and len(programs.cut.exchanges) == 2
