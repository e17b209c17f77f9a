"""peftc.train_adapters: K LoRA or IA3 adapters trained at once on one frozen base, each batch row its own (mLoRA).

    mt = peftc.train_adapters(model, {"sql": {"adapters": [{"method": "lora", "targets": ["q_proj"], "r": 8}]},
                                      "chat": "adapters/chat"})
    out = mt(input_ids=ids, labels=labels, adapter_ids=["sql", "chat", "sql", None])
    out.loss.backward(); optimizer.step()        # each adapter's tensors get its own rows' gradient
    mt.save_adapter("sql", "out/sql")            # a peftc checkpoint, as cm.save_adapter writes

Each adapter starts as its own compiled model (`peftc.compile` of its spec, or a saved or
compiled adapter), whose adapter tensors become this module's parameters. The graph is the
serving graph (adapter ids as a graph input, peftc::lora_multi at every targeted site) with the
banks stacked from those tensors in the graph, so autograd hands each adapter the gradient of
its own rows: what training it alone on those rows would give (IA3's vectors are stacked the same
way into per-row scale banks). The base is captured and stored
once. Adapters with no row in a call take no part in its autograd graph (their requires_grad is
off for the forward), so their `.grad` stays None and optimizers leave them unchanged; that
makes a call not re-entrant across threads, as any training step. LoRA dropout is not applied
(per-row dropout masks are not in the multi-adapter ops): give specs `dropout: 0` for exact
equality with single-adapter training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from peftc.capture.captured import CapturedGraphs
from peftc.capture.example_inputs import example_call
from peftc.compiler.compilation import Compilation
from peftc.compiler.compile import compile_sharing_captures
from peftc.errors import SpecError
from peftc.inspect.report import Report
from peftc.interop.from_peft import load_adapter_dir
from peftc.ir.lora_bank import ServingPlan
from peftc.runtime.checkpoint import save_adapter
from peftc.runtime.compiled import CompiledModel
from peftc.runtime.dispatch import GraphDispatch
from peftc.runtime.user_model import frozen_view
from peftc.serving.routing import adapter_index, check_adapter_names
from peftc.serving.served import batch_size
from peftc.serving.sources import compiled_adapter
from peftc.spec.parse import as_spec


def train_adapters(model: nn.Module, adapters_by_name: Mapping[str, Any], *, example_inputs: Any = None,
                   example_kwargs: dict | None = None) -> "MultiAdapterModel":
    """A module training every adapter of `adapters_by_name` at once, each on the rows that name it.

    Values: a spec (Spec, dict or spec file path) of one LoRA or IA3 entry, a CompiledModel (its adapter
    is copied, the model is not changed), or an adapter folder (peftc or PEFT). Ranks, alphas and
    targets may differ per adapter. The model itself is not changed.
    """
    check_adapter_names(adapters_by_name, "train_adapters", "spec_or_adapter")
    example = example_call(model, example_inputs, example_kwargs)
    captured = CapturedGraphs(across_views=True)  # one model, one call: each adapter's compile reuses the first capture
    own = {name: _own_model(name, value, model, example, captured) for name, value in adapters_by_name.items()}
    # the user's memory; the base frozen in our view only
    compilation = Compilation.start(frozen_view(model), None, captured=captured)
    roots = []
    for k, cm in enumerate(own.values()):
        roots.append(f"adapter{k}")
        compilation.adapter_root.add_module(roots[-1], cm.adapter_root)  # the parameters themselves, shared
    loaded = tuple(compiled_adapter(name, cm) for name, cm in own.items())
    slots = tuple(cm.spec.entry_names()[0] for cm in own.values())
    plan = compilation.train_many_plan(ServingPlan(loaded, params=tuple(roots), slots=slots))
    built = compilation.build(*example, plan)
    return MultiAdapterModel(compilation, plan, built, example, own)


def _own_model(name: str, value: Any, model: nn.Module, example: tuple[tuple, dict],
               captured: CapturedGraphs) -> CompiledModel:
    """The adapter's own compiled model on `model`: its tensors are the ones trained. Compiles share `captured`."""
    args, kwargs = example
    if isinstance(value, CompiledModel):
        cm = compile_sharing_captures(model, value.spec, captured, example_inputs=args, example_kwargs=kwargs)
        cm.adapter_root.load_state_dict(value.adapter_root.state_dict())
    elif isinstance(value, (str, Path)) and Path(value).is_dir():
        cm = load_adapter_dir(model, value, captured=captured, example_inputs=args, example_kwargs=kwargs)
    else:
        cm = compile_sharing_captures(model, as_spec(value), captured, example_inputs=args, example_kwargs=kwargs)
    methods = [entry.method for entry in cm.spec.adapters]
    if methods not in (["lora"], ["ia3"]) or cm.spec.trainable or cm.spec.quantize is not None:
        raise SpecError(f"adapter {name!r}: spec adapters are {methods}; train_adapters takes one 'lora' or 'ia3' "
                        "entry (no 'trainable', no 'quantize'); train other methods with peftc.compile")
    return cm


class MultiAdapterModel(GraphDispatch):
    """`train_adapters`' result: call it as the model plus `adapter_ids` (one per batch row)."""

    def __init__(self, compilation, plan, first, example, own: dict[str, CompiledModel]):
        super().__init__(compilation, plan, first, example, training=True)
        self.adapter_names = list(own)
        object.__setattr__(self, "_own", own)  # plain dict: the per-adapter models are views, not submodules

    def forward(self, *args, adapter_ids: Any = None, **kwargs):
        ids = adapter_index(adapter_ids, self.adapter_names, batch_size(args, kwargs))
        present = set(ids.tolist())
        absent = [p for k, name in enumerate(self.adapter_names) if k not in present
                  for p in self._own[name].adapter_root.parameters() if p.requires_grad]
        gm, args, kwargs = self.graph_for(args, kwargs)
        for p in absent:
            p.requires_grad_(False)
        try:
            return gm(*args, **kwargs, adapter_ids=ids.to(_device(self)))
        finally:
            for p in absent:
                p.requires_grad_(True)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s own parameters, named as in its checkpoint (`<site>.lora.A`)."""
        return dict(self._model(name).adapter_root.named_parameters())

    def adapter_model(self, name: str) -> CompiledModel:
        """Adapter `name` alone on the base: a CompiledModel sharing this module's tensors for it."""
        return self._model(name)

    def save_adapter(self, name: str, directory, format: str = "peftc") -> Path:
        """Write adapter `name` as its own compiled model would (`cm.save_adapter(dir, format)`)."""
        return save_adapter(self._model(name), directory, format=format)

    def _model(self, name: str) -> CompiledModel:
        if name not in self._own:
            raise SpecError(f"adapter {name!r} is not trained here; adapters are {self.adapter_names}")
        return self._own[name]

    def report(self, scope: str | None = None) -> Report:
        """What the passes did, with one row per adapter: its id, method and sites."""
        return Report.build(self, scope)

    def __repr__(self) -> str:
        ranks = {name: sorted({p.shape[0] for key, p in self.adapter_parameters(name).items() if key.endswith(".A")})
                 for name in self.adapter_names}
        return f"MultiAdapterModel({type(self.compilation.source).__name__}, adapters={ranks})"


def _device(module: nn.Module) -> torch.device:
    param = next(module.compilation.source.parameters(), None)
    return param.device if param is not None else torch.device("cpu")

