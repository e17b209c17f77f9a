"""quantize_base: store targeted base linear weights packed (int8, int4, NF4) and dequantize in the graph."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.core.fields import (
    boolean,
    one_of,
    optional_pattern_list,
    parse_dataclass,
    positive_int,
)
from peftc.core.targets import matches_any, select
from peftc.errors import SpecError
from peftc.ir import quantized
from peftc.ir.graph_edit import Inserter, redirect_users
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from . import _lora_inits as lora_inits
from ._site_selection import select_sites

aten = torch.ops.aten
DEFAULT_GROUP = 64


@dataclass(frozen=True)
class QuantizeConfig:
    """The spec's `quantize` section: how the frozen base's linear weights are stored."""

    bits: int = field(default=4, metadata={"check": one_of(8, 4)})
    format: str = field(default="int", metadata={"check": one_of("int", "nf4")})
    group_size: int = field(default=DEFAULT_GROUP, metadata={"check": positive_int})
    double_quant: bool = field(default=False, metadata={"check": boolean})
    targets: tuple = field(default=(), metadata={"check": optional_pattern_list})  # () = every linear but the head
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})
    compute_dtype: str = field(default="float32", metadata={"check": one_of(*quantized.DTYPES)})

    @classmethod
    def from_dict(cls, value: Any, path: str) -> "QuantizeConfig":
        config = parse_dataclass(cls, value, path)
        if config.format == "nf4" and config.bits != 4:
            raise SpecError(f"{path}.bits: format 'nf4' is a 4-bit code book; expected 4, got {config.bits}")
        if config.bits == 8 and config.group_size != DEFAULT_GROUP:  # to_dict writes the default back: allowed
            raise SpecError(f"{path}.group_size: int8 uses one scale per output channel; "
                            "remove group_size or set bits to 4")
        if config.bits == 8 and config.double_quant:
            raise SpecError(f"{path}.double_quant: only 4-bit formats have per-group scales to quantize; "
                            "set bits to 4 or double_quant to false")
        if config.bits == 4 and config.group_size % 2:
            raise SpecError(f"{path}.group_size: two 4-bit codes share a byte; expected an even number, "
                            f"got {config.group_size}")
        return config

    def to_dict(self) -> dict:
        return {f.name: list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple)
                else getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def format_name(self) -> str:
        return "int8" if self.bits == 8 else ("nf4" if self.format == "nf4" else "int4")

    @property
    def dtype(self) -> torch.dtype:
        return quantized.DTYPES[self.compute_dtype]


def needs_quantized_base(spec) -> bool:
    """A `quantize` section, or a LoRA entry with init "loftq" (whose base is a quantized weight)."""
    return spec.quantize is not None or bool(loftq_entries(spec))


def quantize_base(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace each targeted linear site by peftc.quantized_linear over packed buffers; drop the weight."""
    config: QuantizeConfig | None = ctx.spec.quantize
    loftq = loftq_sites(ctx)
    chosen = select_quantize_sites(ctx.sites, config) if config is not None else []
    chosen += [site for site in ctx.sites if site.node_name in loftq and site not in chosen]
    if ctx.shared.quantized is None:  # the first graph packs; every later graph mounts the same tree
        ctx.shared.quantized = nn.Module()
    root = ctx.shared.quantized
    if gm._modules.get(quantized.ROOT, root) is not root:
        raise RuntimeError(f"the captured model already has a submodule named {quantized.ROOT!r}")
    gm.add_module(quantized.ROOT, root)
    nodes = {n.name: n for n in gm.graph.nodes}
    result = PassResult(modified=False)
    for site in chosen:
        site_config = loftq[site.node_name][1] if site.node_name in loftq else config
        module = quantized.weight_module(root, site.param)
        if module is None:
            weight = _out_in(ctx.base_params[site.param], site)
            if site.node_name in loftq:  # LoftQ: pack quant(W - B A), B A its correction (insert_lora reads it)
                entry, _ = loftq[site.node_name]
                start = lora_inits.loftq_factors(weight, entry.r_at(site.path), _codec(site_config), entry.loftq_iter)
                ctx.shared.loftq[site.param] = (start.a, start.b)
                weight = start.quantized_from
            module = quantized.QuantizedWeight.from_weight(weight, site_config)
            quantized.put_weight(root, site.param, module)
        new = _rewrite_site(gm, nodes[site.node_name], site, module, site_config)
        result.replaced_sites[site.node_name] = dataclasses.replace(
            site, node_name=new.name, op="peftc.quantized_linear", input_index=0)
        _drop_weight_if_unread(gm, site.param)
        result.modified = True
        result.sites.append(site.path)
    packed = quantized.summary(gm)
    if packed:
        formats = "/".join(sorted({m.fmt for m in quantized.quantized_weights(root).values()}))
        result.notes.append(f"{formats} base: {packed['weights']} weights packed in {packed['bytes']:,} "
                            f"bytes, {packed['ratio_vs_fp32']:.3f}x their fp32 size")
    return result


def loftq_entries(spec) -> list[tuple[int, Any]]:
    """(index, entry) of the LoRA entries whose init is "loftq"."""
    return [(i, e) for i, e in enumerate(spec.adapters) if getattr(e, "init", None) == "loftq"]


def loftq_sites(ctx: PassContext) -> dict[str, tuple[Any, QuantizeConfig]]:
    """Site node name -> (its LoftQ LoRA entry, how its base is quantized): spec.quantize when the spec
    has it (its bits must be the entry's loftq_bits), else NF4 in groups of 64 or int8 per row, as PEFT's
    LoftQ does with bitsandbytes."""
    out = {}
    for index, entry in loftq_entries(ctx.spec):
        config = _loftq_quantize_config(ctx, index, entry)
        entry_ctx = dataclasses.replace(ctx, entry=entry, entry_index=index)
        for site in select_sites(entry_ctx, entry, kinds=("linear",)):
            out[site.node_name] = (entry, config)
    return out


def _loftq_quantize_config(ctx: PassContext, index: int, entry) -> QuantizeConfig:
    quantize = ctx.spec.quantize
    if quantize is None:
        fmt = "nf4" if entry.loftq_bits == 4 else "int"
        return QuantizeConfig(bits=entry.loftq_bits, format=fmt, compute_dtype=_dtype_name(ctx))
    if quantize.bits != entry.loftq_bits:
        raise SpecError(f"adapters[{index}].loftq_bits: LoftQ quantizes as the base is stored; spec.quantize "
                        f"has {quantize.bits} bits, this entry {entry.loftq_bits}. Make them equal")
    return quantize


def _dtype_name(ctx: PassContext) -> str:
    """The compute dtype of a LoftQ base without a quantize section: the weights' own (float32 or bfloat16)."""
    dtypes = {p.dtype for p in ctx.base_params.values() if p.is_floating_point()}
    return "bfloat16" if dtypes == {torch.bfloat16} else "float32"


def _codec(config: QuantizeConfig) -> lora_inits.Codec:
    return lora_inits.Codec(config.format_name, config.group_size, config.double_quant)


def select_quantize_sites(sites: list[Site], config: QuantizeConfig) -> list[Site]:
    """The linear sites `quantize.targets` selects (default: all but the last, the output head)."""
    paths = list(dict.fromkeys(s.path for s in sites))
    if config.targets:
        chosen = set(select(config.targets, paths, "quantize.targets"))
        wrong = [s for s in sites if s.path in chosen and s.kind != "linear"]
        if wrong:
            raise SpecError(f"quantize.targets: {wrong[0].path!r} is a {wrong[0].kind} site; quantize acts on "
                            "linear sites only. Narrow the pattern or add it to quantize.exclude")
        chosen_sites = [s for s in sites if s.path in chosen]
    else:
        linear = [s for s in sites if s.kind == "linear"]
        chosen_sites = linear[:-1]  # the last linear op is the output head (LM head, classifier)
    chosen_sites = [s for s in chosen_sites if not matches_any(config.exclude, s.path)]
    if config.exclude:
        select(config.exclude, paths, "quantize.exclude")  # an exclude that matches nothing is a typo
    return chosen_sites


def _out_in(weight: torch.Tensor, site: Site) -> torch.Tensor:
    return weight.detach().T if site.layout == "in_out" else weight.detach()


def _bias_of(node: Node) -> Node | None:
    if node.target == aten.linear.default:
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if node.target == aten.addmm.default:
        return node.args[0]
    return None


def _rewrite_site(gm: GraphModule, node: Node, site: Site, module, config: QuantizeConfig) -> Node:
    """linear/addmm/mm/matmul(x, W) -> peftc.quantized_linear(x, [codes, scales...], bias, ...)."""
    if node.target == aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        raise NotImplementedError(f"quantize: addmm with beta/alpha at {site.path!r}; exclude the site")
    tag = {"pass": "quantize_base", "method": None, "site": site.path, "slot": None, "entry": None}
    ins = Inserter(gm, node, tag)
    qdata = [ins.get_attr(f"{quantized.ROOT}.{site.param}.{name}") for name in module.names()]
    new = ins.call(quantized.OP, node.args[site.input_index], qdata, _bias_of(node), module.fmt,
                   module.out_features, module.in_features, module.group_size, config.dtype)
    new.meta["peftc"]["role"] = "quantized_linear"
    redirect_users(list(node.users), node, new)
    weight_reader = node.args[site.input_index + 1]
    gm.graph.erase_node(node)
    if isinstance(weight_reader, Node) and weight_reader.op != "get_attr" and not weight_reader.users:
        gm.graph.erase_node(weight_reader)  # the transpose in front of an mm
    return new


def _drop_weight_if_unread(gm: GraphModule, param: str) -> None:
    """Delete the full-precision weight from the graph module once no node reads it."""
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == param]
    if any(n.users for n in readers):
        return  # still read elsewhere (a tied weight): it stays, and so does its memory
    for node in readers:
        gm.graph.erase_node(node)
    owner_path, _, leaf = param.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner._parameters.pop(leaf, None)
