"""Optional tensor inputs whose default the model computes (position_ids, token_type_ids), in the superset.

A transformers model given no `position_ids` computes its own (LLaMA: `arange(seq)` for every
row; OPT: from the mask's cumulative sum); given none, BERT's `token_type_ids` are zeros. peftc
captures the superset call with such an input passed (its default value) and derives the graph
of a call without it by computing the default inside the graph where the input was read
(peftc.capture.specialize), so either call costs no capture. The default is model-specific, so
before an input joins the superset the model itself is checked on small calls, one of them
left-padded: its output without the input must equal its output with the default passed, bit for
bit (`default_holds`). An input whose check fails (a mask-derived default, GPT-2's token types,
which add an embedding only when passed) stays out of the superset; a call passing it captures.
The superset's position_ids have one row per example; a call passing one row for the whole batch
(`arange(seq)[None]`) is expanded to that when the same kind of check says the model reads it so
(`rows_broadcast`).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Graph, Node

from peftc.capture import layer_stacks
from peftc.capture.binding import forward_signature
from peftc.capture.model_kept import model_kept

aten = torch.ops.aten


@dataclass(frozen=True)
class InputDefault:
    value: Callable[[torch.Tensor], torch.Tensor]  # the default for a [batch, seq] main input, eagerly
    in_graph: Callable[[Graph, Node, torch.Tensor], Node]  # the same ops in a graph, from the main input node


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)


def _zeros(ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(ids.shape, dtype=torch.long, device=ids.device)


def _positions_in_graph(graph: Graph, ids: Node, like: torch.Tensor) -> Node:
    batch, seq = (graph.call_function(aten.sym_size.int, (ids, d)) for d in (0, 1))
    row = graph.call_function(aten.arange.default, (seq,), {"dtype": torch.long, "device": like.device})
    return graph.call_function(aten.expand.default, (graph.call_function(aten.unsqueeze.default, (row, 0)), [batch, seq]))


def _zeros_in_graph(graph: Graph, ids: Node, like: torch.Tensor) -> Node:
    batch, seq = (graph.call_function(aten.sym_size.int, (ids, d)) for d in (0, 1))
    return graph.call_function(aten.zeros.default, ([batch, seq],), {"dtype": torch.long, "device": like.device})


DEFAULTS: dict[str, InputDefault] = {
    "position_ids": InputDefault(_positions, _positions_in_graph),
    "token_type_ids": InputDefault(_zeros, _zeros_in_graph),
}
MAIN_INPUT = "input_ids"  # the defaults are shaped after it
EMBEDS_INPUT = "inputs_embeds"  # or after the embeddings passed in its place (peftc.capture.embeds_input)
FLAG_CHECK = "{}=True"  # default_holds' item for "this output flag only adds outputs"
ROWS = "position_ids rows"  # default_holds' key for "one row of position_ids stands for every row"
_HOLDS: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def default_inputs(model: nn.Module, kwargs: dict) -> dict:
    """The defaulted inputs this call leaves out, as the model would compute them, for those whose default
    holds for this model (checked once per model: `default_holds`)."""
    ids = kwargs.get(MAIN_INPUT)
    return {name: DEFAULTS[name].value(ids) for name in default_inputs_to_check(model, kwargs)
            if default_holds(model, (name,))}


def default_inputs_to_check(model: nn.Module, kwargs: dict) -> list[str]:
    """The inputs with a default that this call leaves out and could join the superset, if checked."""
    return _left_out(forward_signature(model).parameters, kwargs)


def default_values(params, kwargs: dict) -> dict:
    """The default of every input with one that a forward taking `params` is called without (unchecked:
    what a derived graph's guards stand in for an input the superset held)."""
    ids = kwargs.get(MAIN_INPUT)
    return {name: DEFAULTS[name].value(ids) for name in _left_out(params, kwargs)}


def _left_out(params, kwargs: dict) -> list[str]:
    ids = kwargs.get(MAIN_INPUT)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return []
    return [name for name in DEFAULTS if name in params and name not in kwargs]


def settle(model: nn.Module, checks: list[str], example: dict | None = None) -> None:
    """Check all of `checks` (default names, FLAG_CHECK of flags) with one pair of calls, and each alone only
    if that fails (an eager forward costs more than its maths on a small call)."""
    if checks and default_holds(model, tuple(checks), example):
        known = _HOLDS.setdefault(model, {})
        for check in checks:
            known[(check,)] = True


def rows_broadcast(model: nn.Module, kwargs: dict) -> dict:
    """`kwargs` with a one-row `position_ids` expanded to the batch, where the model reads one row as every
    row's (checked as defaults are): a graph captured with a position per row then takes the call."""
    ids, positions = kwargs.get(MAIN_INPUT), kwargs.get("position_ids")
    if not (isinstance(ids, torch.Tensor) and isinstance(positions, torch.Tensor) and ids.dim() == positions.dim() == 2):
        return kwargs
    if positions.shape[0] != 1 or ids.shape[0] == 1 or positions.shape[1] != ids.shape[1]:
        return kwargs
    if not default_holds(model, ROWS):
        return kwargs
    return {**kwargs, "position_ids": positions.expand(ids.shape[0], -1)}


def flag_only_adds_outputs(model: nn.Module, flag: str, example: dict | None = None) -> bool:
    """Whether `flag=True` (output_hidden_states, output_attentions) only adds output fields: every field of
    the call without it comes out the same with it (not so where asking for attention weights switches
    the attention code, as in Falcon). Checked as defaults are, cached per model."""
    return default_holds(model, (FLAG_CHECK.format(flag),), example)


def default_holds(model: nn.Module, names: tuple[str, ...] | str, example: dict | None = None) -> bool:
    """Whether `model` without the inputs `names` computes what it computes with their DEFAULTS passed
    (or, for ROWS, with one row of positions as with that row for every example); cached per model.

    Checked on a small call whose first row is left-padded and whose second is not, without the
    inputs and with them (same ids, eval mode, no grad, a stack of alike layers cut to two as
    peftc.capture.layer_stacks traces it), bit for bit."""
    known = _HOLDS.setdefault(model, {})
    if names not in known:
        known[names] = _check(model, names, example)
    return known[names]


def small_call(model: nn.Module, example: dict | None) -> dict | None:
    """Token ids (2 x 5, the first row left-padded) for a model that reads them, else the first two rows
    of the example call's tensors (images); None if neither."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    parameter = next(model.parameters(), None)
    if parameter is None:
        return None
    if MAIN_INPUT not in forward_signature(model).parameters or not isinstance(vocab, int):
        if not example or any(name == MAIN_INPUT for name in example):
            return None
        return {name: value[:2] if isinstance(value, torch.Tensor) and value.dim() > 0 else value
                for name, value in example.items()}
    ids = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(0)).to(parameter.device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a mask-derived default (OPT's positions) differs from arange on this row
    call = {MAIN_INPUT: ids, "attention_mask": mask}
    if "use_cache" in forward_signature(model).parameters:
        call["use_cache"] = False
    return call


def _check(model: nn.Module, names: tuple[str, ...] | str, example: dict | None) -> bool:
    call = small_call(model, example)
    if call is None:
        return False
    ids = call.get(MAIN_INPUT)
    if names == ROWS:
        row = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) + 1
        without, given = {"position_ids": row}, {"position_ids": row.expand(ids.shape[0], -1)}
    else:  # defaults passed; output flags on (the fields they add are not compared)
        flag_suffix = FLAG_CHECK.format("")
        without = {}
        given = {name[: -len(flag_suffix)]: True for name in names if name.endswith(flag_suffix)}
        given.update({name: DEFAULTS[name].value(ids) for name in names if not name.endswith(flag_suffix)})
    try:
        with checking(model):
            plain = model(**call, **without)
            flagged = model(**call, **given)
            if hasattr(plain, "keys") and hasattr(flagged, "keys"):  # fields the flag adds are not compared
                flagged = type(plain)(**{key: flagged[key] for key in plain if key in flagged})
            return identical(plain, flagged)
    except Exception:  # noqa: BLE001  a model that refuses the check's call keeps the inputs out of the superset
        return False


def once_per_model(check: Callable[[nn.Module], bool]) -> Callable[[nn.Module], bool]:
    """`check(model)` run on a model's first call only, its answer kept while the model lives (the eager checks
    behind derived graphs: one small forward or two per model)."""
    answers: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    @functools.wraps(check)
    def once(model: nn.Module) -> bool:
        if model not in answers:
            answers[model] = check(model)
        return answers[model]

    return once


@contextlib.contextmanager
def checking(model: nn.Module) -> Iterator[None]:
    """How a check calls the model: eval mode, no grad, what the forward leaves undone after, and a stack
    of alike layers run as two (as a capture traces it: the inputs reach every layer alike)."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), model_kept(model), layer_stacks.cut_to_two(model, layer_stacks.find_stacks(model)):
            yield
    finally:
        for module, training in modes.items():
            module.training = training


def substitute_default(graph: Graph, placeholder: Node, main: Node, name: str) -> None:
    """Compute `name`'s default from `main` (the input_ids placeholder) where `placeholder` was read."""
    like = placeholder.meta.get("val")
    last_input = list(graph.find_nodes(op="placeholder"))[-1]
    with graph.inserting_before(last_input.next):  # after every input, before the first op reads it
        value = DEFAULTS[name].in_graph(graph, main, like)
    if isinstance(like, torch.Tensor):
        value.meta["val"] = like
    placeholder.replace_all_uses_with(value)


def identical(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        for x, y in zip(la, lb))


def _leaves(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [] if value is None else [value]
