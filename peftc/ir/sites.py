"""Sites: the ops that multiply by (or look up) a parameter, found in a captured graph.

A site is an *operation*, not a Python class: nn.Linear (aten.linear), GPT-2's Conv1D
(addmm against a [in, out] weight), a bare F.linear, Falcon's `x @ W.T` (matmul against a
transposed parameter), nn.MultiheadAttention's in-projection, a (grouped) convolution, an
embedding lookup and the grouped/batched matmuls of MoE experts over a 3-D parameter are all
sites. An expert parameter is one site however many ops read it (its experts counted in
`Site.experts`): methods rewrite such a parameter where it is read, as PEFT's ParamWrapper does.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

aten = torch.ops.aten

CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
TRANSPOSE_OPS = (aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int)
# Ops that read a 3-D expert parameter [E, ., .], and the position of that operand. The matmul
# family reads [E, in, out] (a transpose of a stored [E, out, in]); a gather reads the stored one.
EXPERT_MATMULS = {"transformers.grouped_mm_fallback.default": 1, "aten._grouped_mm.default": 1,
                  "aten.bmm.default": 1, "aten.matmul.default": 1, "aten.baddbmm.default": 2}
ROW_SPLITS = (aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, aten.unsafe_split.Tensor)
EXPERT_GATHERS = {"aten.index.Tensor": 0, "aten.index_select.default": 0, "aten.embedding.default": 0}


# Site kinds whose methods update the parameter where it is read (W + ΔW), not the op's output.
PARAMETER_KINDS = ("experts", "rows")


@dataclass(frozen=True)
class Site:
    path: str  # readable name: the module path, or module path + parameter name
    kind: str  # "linear" | "conv" | "embedding" | "experts" | "rows" (a linear over row slices of a weight)
    node_name: str  # the name of its op node in the graph it was found in (a name, not the Node)
    op: str  # e.g. "aten.linear.default"
    param: str  # fully qualified name of the weight parameter
    module_path: str  # module the op ran in (from nn_module_stack)
    in_features: int
    out_features: int
    layout: str  # "out_in": weight is [out, in] (nn.Linear); "in_out": [in, out] (Conv1D)
    input_index: int  # position of the activation among the op's args
    # > 0: an expert parameter [E, out, in] ("out_in") or [E, in, out] ("in_out"); in/out per expert
    experts: int = 0

    @property
    def weight_shape(self) -> tuple:
        shape = (self.out_features, self.in_features) if self.layout == "out_in" else (
            self.in_features, self.out_features)
        return (self.experts, *shape) if self.experts else shape


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
    if _is_transpose(weight_arg):
        found = parameter_of(gm, weight_arg.args[0])
        if found is not None and found[1].dim() == 2:
            return (*found, "out_in")
    return None


def _is_transpose(node, ndim: int = 2) -> bool:
    """`node` swaps the last two dims of an `ndim`-D tensor (t, .T, transpose, permute)."""
    if not isinstance(node, Node) or node.target not in TRANSPOSE_OPS:
        return False
    if node.target in (aten.t.default, aten.numpy_T.default):
        return ndim == 2
    if node.target == aten.permute.default:
        return list(node.args[1]) == [*range(ndim - 2), ndim - 1, ndim - 2]
    dims = sorted(d % ndim for d in node.args[1:3])
    return dims == [ndim - 2, ndim - 1]


def _sliced_weight(gm: GraphModule, weight_arg) -> tuple[str, nn.Parameter] | None:
    """The 2-D parameter whose row block `weight_arg` is (getitem of a split along dim 0, or a dim-0 slice):
    nn.MultiheadAttention splits in_proj_weight so when query and key differ."""
    if not isinstance(weight_arg, Node):
        return None
    source = None
    if weight_arg.target == operator.getitem and isinstance(weight_arg.args[0], Node) \
            and weight_arg.args[0].target in ROW_SPLITS:
        split = weight_arg.args[0]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        source = split.args[0] if dim == 0 else None
    elif weight_arg.target == aten.slice.Tensor and (weight_arg.args[1] if len(weight_arg.args) > 1 else 0) == 0:
        source = weight_arg.args[0]
    found = parameter_of(gm, source)
    return found if found is not None and found[1].dim() == 2 else None


def _expert_weight(gm: GraphModule, node: Node) -> tuple[str, nn.Parameter, str] | None:
    """(FQN, parameter, layout) of the 3-D expert parameter an expert matmul or gather reads."""
    name = _op_name(node)
    index = EXPERT_MATMULS.get(name, EXPERT_GATHERS.get(name))
    if index is None or len(node.args) <= index:
        return None
    arg = node.args[index]
    found = parameter_of(gm, arg)
    if found is not None and found[1].dim() == 3:
        return (*found, "in_out" if name in EXPERT_MATMULS else "out_in")
    if name in EXPERT_MATMULS and _is_transpose(arg, ndim=3):
        found = parameter_of(gm, arg.args[0])
        if found is not None and found[1].dim() == 3:
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
        found = _sliced_weight(gm, node.args[1])
        if found:  # one site for the whole weight: methods update the weight before it is split
            fqn, w = found
            return dict(kind="rows", param=fqn, in_features=w.shape[1], out_features=w.shape[0],
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
    expert = _expert_weight(gm, node)
    if expert is not None:
        fqn, w, layout = expert
        in_f, out_f = (w.shape[2], w.shape[1]) if layout == "out_in" else (w.shape[1], w.shape[2])
        return dict(kind="experts", param=fqn, in_features=in_f, out_features=out_f, layout=layout,
                    input_index=0, experts=w.shape[0])
    return None


def conv_groups(node: Node) -> int:
    index = 8 if node.target == aten.convolution.default else 6
    return node.args[index] if len(node.args) > index else 1


def find_sites(gm: GraphModule) -> list[Site]:
    """Every site in graph order, with unique readable paths."""
    sites: list[Site] = []
    param_of_path: dict[str, str] = {}
    expert_params: set[str] = set()
    for node in gm.graph.nodes:
        fields = classify(gm, node)
        if fields is None:
            continue
        if fields["kind"] in PARAMETER_KINDS:  # one site per parameter, at the first op reading it
            if fields["param"] in expert_params:
                continue
            expert_params.add(fields["param"])
        module_path = module_path_of(node)
        path = _site_path(module_path, fields["param"])
        if param_of_path.get(path, fields["param"]) != fields["param"]:
            path = f"{module_path}.{fields['param'].rsplit('.', 1)[-1]}".strip(".")
        param_of_path[path] = fields["param"]
        sites.append(Site(path=path, node_name=node.name, op=_op_name(node), module_path=module_path, **fields))
    return sites


def _site_path(module_path: str, param: str) -> str:
    """'q_proj' for 'q_proj.weight'; the module path for a tied weight owned elsewhere.

    nn.MultiheadAttention's ops run in the attention module itself: its in_proj_weight is the
    module's own weight ('attn'), its out_proj's weight the child's ('attn.out_proj'), as PEFT names them.
    """
    if module_path and param.startswith(module_path + "."):
        leaf = param[len(module_path) + 1:]
        if leaf in ("weight", "in_proj_weight"):
            return module_path
        return f"{module_path}.{leaf[: -len('.weight')]}" if leaf.endswith(".weight") else f"{module_path}.{leaf}"
    if not module_path:
        return param[: -len(".weight")] if param.endswith(".weight") else param
    return module_path


def _op_name(node: Node) -> str:
    return str(node.target).replace("torch.ops.", "")
