"""Functional routing: the adapter ids are a graph input, so threads share one served model safely,
and every bad id is a SpecError naming it."""

from __future__ import annotations

import threading

import pytest
import torch
from families import FAMILIES, compile_family, logits, randomize_adapters
from hypothesis import given, settings
from hypothesis import strategies as st

import peftc
from peftc import SpecError
from peftc.passes.add_routing_input import ROUTING_INPUT
from peftc.serving.routing import adapter_index

FAMILY = FAMILIES["llama"]
BATCH, SEQ = 4, 3
SPECS = {"sql": {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8},
         "chat": {"method": "lora", "targets": ["v_proj", "down_proj"], "r": 2, "alpha": 3}}


@pytest.fixture(scope="module")
def served():
    inputs = FAMILY.inputs(BATCH, SEQ)
    cms = {}
    for seed, (name, entry) in enumerate(SPECS.items()):
        _, cms[name] = compile_family(FAMILY, {"adapters": [entry]}, example_kwargs=inputs)
        randomize_adapters(cms[name], std=0.3, seed=seed)
    return peftc.serve_adapters(FAMILY.build(), cms, example_kwargs=inputs), cms


def test_ids_are_a_graph_input_not_a_buffer(served):
    mm, _ = served
    placeholders = [n.name for n in mm.graph_module.graph.find_nodes(op="placeholder")]
    assert placeholders[-1] == ROUTING_INPUT
    multi = [n for n in mm.graph_module.graph.nodes if n.target == torch.ops.peftc.lora_multi.default]
    assert multi and all(n.args[-1].name == ROUTING_INPUT for n in multi)
    assert not [name for name, _ in mm.named_buffers() if "seq_ids" in name or "routing" in name]


def logits_from_threads(mm, inputs: dict, calls: list, *, threads: int = 8, timeout: float) -> dict:
    """{i: logits of mm(**inputs, adapter_ids=calls[i])}, the calls made from `threads` threads released
    together (thread k makes calls k, k + threads, ...); the first error a thread met is raised here."""
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(k: int) -> None:
        start.wait(timeout=60)
        try:
            with torch.no_grad():
                for i in range(k, len(calls), threads):
                    got[i] = logits(mm(**inputs, adapter_ids=calls[i]))
        except BaseException as err:  # reported below, with the thread's call
            errors.append(err)

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=timeout)
    assert not errors, errors[0]
    return got


def test_eight_threads_give_the_sequential_outputs(served):
    mm, _ = served
    inputs = FAMILY.inputs(BATCH, SEQ)
    g = torch.Generator().manual_seed(3)
    calls = [torch.randint(-1, 2, (BATCH,), generator=g) for _ in range(48)]  # distinct id rows per call
    with torch.no_grad():
        want = [logits(mm(**inputs, adapter_ids=ids)) for ids in calls]
    got = logits_from_threads(mm, inputs, calls, timeout=120)
    assert sorted(got) == list(range(len(calls)))
    differing = [i for i in range(len(calls)) if not torch.equal(got[i], want[i])]
    assert differing == []
    assert not torch.equal(want[0], logits(mm(**inputs, adapter_ids=[-1] * BATCH)))  # the ids do matter


def test_threads_meeting_a_new_signature_build_it_once(served):
    """8 threads' first call with position_ids (a new call signature): one graph, sequential outputs.

    (Not an attention mask: a call without one binds to the all-ones mask, the graph it already has. use_cache=False:
    a plain call would run the cached graph, which returns the cache as the original does.)
    """
    mm, _ = served
    inputs = {**FAMILY.inputs(BATCH, SEQ), "position_ids": torch.arange(SEQ).expand(BATCH, SEQ), "use_cache": False}
    graphs_before = len(mm.graphs)
    calls = [torch.tensor([k % 3 - 1, 0, 1, -1]) for k in range(8)]
    got = logits_from_threads(mm, inputs, calls, timeout=300)
    assert len(mm.graphs) == graphs_before + 1
    with torch.no_grad():
        for k, ids in enumerate(calls):
            assert torch.equal(got[k], logits(mm(**inputs, adapter_ids=ids)))


def test_served_model_deep_copies(served):
    import copy

    mm, _ = served
    twin = copy.deepcopy(mm)
    inputs = FAMILY.inputs(BATCH, SEQ)
    with torch.no_grad():
        torch.testing.assert_close(logits(twin(**inputs, adapter_ids=[0, 1, -1, 0])),
                                   logits(mm(**inputs, adapter_ids=[0, 1, -1, 0])))
    assert twin._build_lock is not mm._build_lock


def test_rows_equal_each_adapter_alone(served):
    mm, cms = served
    inputs = FAMILY.inputs(BATCH, SEQ)
    rows = ["chat", None, "sql", "chat"]
    with torch.no_grad():
        got = logits(mm(**inputs, adapter_ids=rows))
        for name, cm in cms.items():
            picked = [i for i, r in enumerate(rows) if r == name]
            torch.testing.assert_close(got[picked], logits(cm(**inputs))[picked], atol=1e-5, rtol=1e-5)


NAMES = ["sql", "chat"]


@pytest.mark.parametrize("ids, match", [
    (["sql", "zzz", None, None], r"adapter_ids\[1\]: unknown adapter 'zzz'"),
    (["", None, None, None], r"adapter_ids\[0\]: unknown adapter ''"),
    ([0, 1, 2, -1], r"adapter_ids\[2\]: 2 is out of range; ids are 0..1"),
    ([0, -2, 0, 0], r"adapter_ids\[1\]: -2 is out of range"),
    ([0, 2 ** 63, 0, 0], r"adapter_ids\[1\]: 9223372036854775808 is out of range"),
    ([0, 0, -2 ** 64, 0], r"adapter_ids\[2\]: -18446744073709551616 is out of range"),
    ([True, 0, 0, 0], r"adapter_ids\[0\]: True is a bool, not an adapter"),
    ([0, 0, 0, 1.0], r"adapter_ids\[3\]: 1.0 \(float\) is not an adapter id"),
    (["sql", "chat", None], r"3 ids for a batch of 4; pass one id per batch row"),
    (torch.tensor([0, 1, 5, 0]), r"adapter_ids\[2\]: 5 is out of range"),
    (torch.tensor([True, False, True, True]), r"expected a 1-D integer tensor, got torch.bool"),
    (torch.zeros(4), r"expected a 1-D integer tensor, got torch.float32"),
    (torch.zeros(2, 2, dtype=torch.long), r"of shape \(2, 2\)"),
    (None, r"adapter_ids: missing"),
])
def test_bad_ids_name_the_id(ids, match):
    with pytest.raises(SpecError, match=match):
        adapter_index(ids, NAMES, batch=4)


def test_bad_ids_raise_through_the_served_model(served):
    mm, _ = served
    inputs = FAMILY.inputs(BATCH, SEQ)
    with pytest.raises(SpecError, match=r"adapter_ids\[3\]: 9223372036854775808 is out of range"):
        mm(**inputs, adapter_ids=[0, 0, 0, 2 ** 63])
    with pytest.raises(SpecError, match=r"adapter_ids\[0\]: True is a bool"):
        mm(**inputs, adapter_ids=[True, 0, 0, 0])


def test_empty_adapter_name_is_refused(served):
    _, cms = served
    with pytest.raises(SpecError, match="adapter name '' is not usable"):
        peftc.serve_adapters(FAMILY.build(), {"": cms["sql"]})


ID = st.one_of(st.none(), st.just("__base__"), st.sampled_from(NAMES), st.integers(-1, len(NAMES) - 1))
BAD = st.one_of(st.integers(max_value=-2), st.integers(min_value=len(NAMES)), st.booleans(),
                st.text(max_size=5).filter(lambda s: s not in (*NAMES, "__base__")),
                st.floats(allow_nan=True))


@settings(max_examples=60, deadline=None)
@given(st.lists(ID, min_size=1, max_size=6))
def test_good_id_lists_map_to_bank_indices(ids):
    got = adapter_index(ids, NAMES, batch=len(ids))
    want = [-1 if i in (None, "__base__") else NAMES.index(i) if isinstance(i, str) else i for i in ids]
    assert got.dtype == torch.long and got.tolist() == want


@settings(max_examples=80, deadline=None)
@given(st.lists(ID, max_size=5), BAD, st.data())
def test_one_bad_id_in_a_list_is_named(ids, bad, data):
    row = data.draw(st.integers(0, len(ids)))
    ids = [*ids[:row], bad, *ids[row:]]
    with pytest.raises(SpecError, match=rf"adapter_ids\[{row}\]: "):
        adapter_index(ids, NAMES, batch=len(ids))
