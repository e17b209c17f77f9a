"""Sites: the ops that multiply by (or look up) a parameter, found in a captured graph.

A site is an *operation*, not a Python class: nn.Linear (aten.linear), GPT-2's Conv1D
(addmm against a [in, out] weight), a bare F.linear, a matmul against a parameter, a
convolution and an embedding lookup are all sites.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

aten = torch.ops.aten

CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
TRANSPOSE_OPS = (aten.t.default, aten.permute.default, aten.transpose.int)


@dataclass(frozen=True)
class Site:
    path: str  # readable name: the module path, or module path + parameter name
    kind: str  # "linear" | "conv" | "embedding"
    node: str  # name of the op node in the graph it was found in
    op: str  # e.g. "aten.linear.default"
    param: str  # fully qualified name of the weight parameter
    module_path: str  # module the op ran in (from nn_module_stack)
    in_features: int
    out_features: int
    layout: str  # "out_in": weight is [out, in] (nn.Linear); "in_out": [in, out] (Conv1D)
    input_index: int  # position of the activation among the op's args

    @property
    def weight_shape(self) -> tuple:
        return (self.out_features, self.in_features) if self.layout == "out_in" else (
            self.in_features, self.out_features)


def module_path_of(node: Node) -> str:
    """The innermost module an op came from, e.g. 'model.layers.0.self_attn.q_proj'."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Older exporters write "L['self'].layers[0]" style paths; normalize to dotted FQNs.
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\w+)\]", r".\1", path).strip(".")


def parameter_of(gm: GraphModule, node) -> tuple[str, nn.Parameter] | None:
    """(FQN, parameter) if `node` reads a parameter (not a buffer), possibly through a transpose."""
    if isinstance(node, Node) and node.op == "get_attr":
        try:
            value = gm.get_parameter(node.target)
        except AttributeError:
            return None
        return node.target, value
    return None


def _weight_and_layout(gm: GraphModule, weight_arg) -> tuple[str, nn.Parameter, str] | None:
    """For mm-style ops: a direct [in, out] parameter, or a transposed [out, in] one."""
    found = parameter_of(gm, weight_arg)
    if found is not None:
        return (*found, "in_out")
    if isinstance(weight_arg, Node) and weight_arg.target in TRANSPOSE_OPS and len(weight_arg.users) >= 1:
        found = parameter_of(gm, weight_arg.args[0])
        if found is not None and found[1].dim() == 2:
            return (*found, "out_in")
    return None


def classify(gm: GraphModule, node: Node) -> dict | None:
    """Site fields for `node` if it consumes a parameter as its weight, else None."""
    if node.op != "call_function":
        return None
    target = node.target
    if target == aten.linear.default:
        found = parameter_of(gm, node.args[1])
        if found and found[1].dim() == 2:
            fqn, w = found
            return dict(kind="linear", param=fqn, in_features=w.shape[1], out_features=w.shape[0],
                        layout="out_in", input_index=0)
    elif target in (aten.addmm.default, aten.mm.default, aten.matmul.default):
        x_index = 1 if target == aten.addmm.default else 0
        if len(node.args) > x_index + 1:
            found = _weight_and_layout(gm, node.args[x_index + 1])
            if found and found[1].dim() == 2:
                fqn, w, layout = found
                in_f, out_f = (w.shape[0], w.shape[1]) if layout == "in_out" else (w.shape[1], w.shape[0])
                return dict(kind="linear", param=fqn, in_features=in_f, out_features=out_f,
                            layout=layout, input_index=x_index)
    elif target in CONV_OPS:
        transposed = target == aten.convolution.default and bool(node.args[6])
        found = parameter_of(gm, node.args[1])
        if found and not transposed:
            fqn, w = found
            return dict(kind="conv", param=fqn, in_features=w.shape[1] * conv_groups(node),
                        out_features=w.shape[0], layout="out_in", input_index=0)
    elif target == aten.embedding.default:
        found = parameter_of(gm, node.args[0])
        if found and found[1].dim() == 2:
            fqn, w = found
            return dict(kind="embedding", param=fqn, in_features=w.shape[0], out_features=w.shape[1],
                        layout="out_in", input_index=1)
    return None


def conv_groups(node: Node) -> int:
    index = 8 if node.target == aten.convolution.default else 6
    return node.args[index] if len(node.args) > index else 1


def find_sites(gm: GraphModule) -> list[Site]:
    """Every site in graph order, with unique readable paths."""
    sites: list[Site] = []
    param_of_path: dict[str, str] = {}
    for node in gm.graph.nodes:
        fields = classify(gm, node)
        if fields is None:
            continue
        module_path = module_path_of(node)
        path = _site_path(module_path, fields["param"])
        if param_of_path.get(path, fields["param"]) != fields["param"]:
            path = f"{module_path}.{fields['param'].rsplit('.', 1)[-1]}".strip(".")
        param_of_path[path] = fields["param"]
        sites.append(Site(path=path, node=node.name, op=_op_name(node), module_path=module_path, **fields))
    return sites


def _site_path(module_path: str, param: str) -> str:
    """'q_proj' for 'q_proj.weight'; the module path for a tied weight owned elsewhere."""
    if module_path and param.startswith(module_path + "."):
        leaf = param[len(module_path) + 1:]
        return module_path if leaf == "weight" else f"{module_path}.{leaf}"
    if not module_path:
        return param[: -len(".weight")] if param.endswith(".weight") else param
    return module_path


def _op_name(node: Node) -> str:
    return str(node.target).replace("torch.ops.", "")
