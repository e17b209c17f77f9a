"""checkpoint_layers: outline each layer into a submodule that recomputes its activations in backward."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.ir.layer_program import CompiledLayer, recomputed
from peftc.ir.outline import is_attribute, layer_regions, mutates, outline, read_by_several
from peftc.pipeline.runner import PassContext, PassResult

NAME_PREFIX = "peftc_checkpointed"


class CheckpointedLayer(nn.Module):
    """Runs one outlined layer through torch.utils.checkpoint while training with grad enabled.

    Only the layer's inputs are saved for backward; its inner activations are recomputed
    (with the RNG state of the first run, so dropout masks match). `enabled = False` runs
    the layer plainly, which is what gradient_checkpointing_disable() sets.
    """

    def __init__(self, body: GraphModule, path: str, num_held: int):
        super().__init__()
        self.body = body
        self.path = path
        self.num_held = num_held  # trailing inputs the layer holds instead of saving (weights, shared masks)
        self.enabled = True

    def forward(self, *inputs):
        if not (self.enabled and torch.is_grad_enabled()):
            return self.body(*inputs)
        return recomputed(self.body, inputs, self.num_held)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, enabled={self.enabled}"


def checkpoint_layers(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Outline every layer of each layer stack and call it through torch.utils.checkpoint."""
    result = PassResult(modified=False)
    regions = layer_regions(gm)
    shared = read_by_several(regions)
    for region in regions:
        if mutates(region):  # a recomputed in-place update (batch-norm statistics) would apply twice
            result.notes.append(f"{region.path}: not checkpointed, it updates a tensor in place")
            continue
        name = f"{NAME_PREFIX}_{region.path.replace('.', '_')}"
        outline(gm, region, name, lambda body, held, path=region.path: CheckpointedLayer(body, path, held),
                trailing=lambda node: is_attribute(node) or node in shared)
        result.modified = True
        result.sites.append(region.path)
    return result


def checkpoint_graph(gm: GraphModule, every_n_layers: int = 1) -> None:
    """Checkpoint `gm`'s layers: outline them the first time (a flat graph), switch recomputation back on
    after (and in a layer-structured graph, whose layers checkpoint themselves)."""
    if not set_checkpointing(gm, True, every_n_layers):
        checkpoint_layers(gm, None)
        gm.recompile()
        set_checkpointing(gm, True, every_n_layers)


def set_checkpointing(gm: GraphModule, enabled: bool, every_n_layers: int = 1) -> bool:
    """Turn recomputation on (in every `every_n_layers`-th layer, as transformers counts them: layers
    0, n, 2n, ...) or off in the layers checkpoint_layers outlined; False if there are none."""
    if every_n_layers < 1:
        raise ValueError(f"every_n_layers: expected an integer >= 1, got {every_n_layers!r}")
    layers = [m for m in gm.modules() if isinstance(m, (CheckpointedLayer, CompiledLayer))]
    for index, layer in enumerate(layers):
        on = enabled and index % every_n_layers == 0
        if isinstance(layer, CompiledLayer):
            layer.checkpointed = on
        else:
            layer.enabled = on
    return bool(layers)


