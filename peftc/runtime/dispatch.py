"""GraphDispatch: an nn.Module that runs the graph built for each call's signature.

torch.export specializes a graph on which arguments a call passes (labels or not, a mask or
not). A dispatch keeps one graph per call signature: the first, built when it was made, and
others built on first use of a new signature by the same Compilation and plan, so every graph
shares the same base weights and the same adapter parameters.
"""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

from peftc.capture.calls import CallSignature, normalize_call
from peftc.ir.modes import set_mode


class GraphDispatch(nn.Module):
    """Runs `compilation.build(args, kwargs, plan)`'s graph for each call signature."""

    def __init__(self, compilation, plan, first, example: tuple[tuple, dict], training: bool = False):
        super().__init__()
        self.training = training
        self.compilation = compilation  # a dataclass, not a module: the user's model is not our submodule
        self.plan = plan
        self.graph_module = first.graph_module
        self.records = first.records
        self.sites = list(first.sites)
        self._example = example  # the first graph's call: other plans build their first graph from it
        self._graphs = {CallSignature.of(*example): first.graph_module}
        set_mode(first.graph_module, self.training)

    @property
    def example_call(self) -> tuple[tuple, dict]:
        """The (args, kwargs) the first graph was captured from."""
        return self._example

    @property
    def graphs(self) -> dict[CallSignature, GraphModule]:
        return dict(self._graphs)

    def forward(self, *args, **kwargs):
        gm, args, kwargs = self.graph_for(args, kwargs)
        return gm(*args, **kwargs)

    def graph_for(self, args: tuple, kwargs: dict) -> tuple[GraphModule, tuple, dict]:
        """The graph for this call's signature (built on first use) and the call, normalized."""
        args, kwargs = normalize_call(self.compilation.source, args, kwargs)
        signature = CallSignature.of(args, kwargs)
        gm = self._graphs.get(signature)
        if gm is None:
            gm = self.compilation.build(args, kwargs, self.plan).graph_module
            set_mode(gm, self.training)
            self._graphs[signature] = gm
        return gm, args, kwargs

    def train(self, mode: bool = True):
        # Exported graph modules refuse .train(); the mode lives in the graph's nodes instead.
        self.training = mode
        for gm in self._graphs.values():
            set_mode(gm, mode)
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for gm in self._graphs.values():
            if gm is not self.graph_module:
                gm._apply(fn, recurse)
        return self
