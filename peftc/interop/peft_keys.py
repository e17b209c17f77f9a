"""Tensor names, both ways: peftc's adapter_state_dict() names and HF PEFT's state-dict keys.

peftc: `<site path>.<slot>.<tensor>` (e.g. `model.layers.0.self_attn.q_proj.lora.A`), copies at
`<owner>.<slot>.<leaf>`, base parameters the spec trains in place under their own FQN.
PEFT (adapter name already stripped, as in adapter_model.safetensors):
`base_model.model.<module path>.<peft tensor>` (e.g. `...q_proj.lora_A.weight`); trained base
parameters under their FQN, with `base_layer.` inserted when PEFT wrapped that module.
"""

from __future__ import annotations

import re

from peftc.ir import adapters

PREFIX = "base_model.model."

# peftc tensor name -> PEFT key suffix, per method, per site kind ("*": any kind).
TENSOR_NAMES: dict[str, dict[str, dict[str, str]]] = {
    "lora": {
        "embedding": {"A": "lora_embedding_A", "B": "lora_embedding_B"},
        "*": {"A": "lora_A.weight", "B": "lora_B.weight", "B_bias": "lora_B.bias"},
    },
    "dora": {
        "embedding": {"A": "lora_embedding_A", "B": "lora_embedding_B", "magnitude": "lora_magnitude_vector"},
        "*": {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"},
    },
    "ia3": {"*": {"l": "ia3_l"}},  # PEFT's is [out, 1], or [1, in] on a feedforward site; peftc's is flat
    "loha": {"*": {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}},
    "lokr": {"*": {n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                  "lokr_t2")}},
    # A and B: the shared projections, regenerated from the seed; PEFT saves them (save_projection) at
    # base_model.vera_A / vera_B, peftc checks them against its own when present.
    "vera": {"*": {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d", "A": "vera_A", "B": "vera_B"}},
    "prompt": {"*": {"embedding": "prompt_embeddings"}},
    "trainable_tokens": {"*": {"delta": "trainable_tokens_delta"}},
    # one table in PEFT; peft_prefix.py splits and joins it through these per-op names
    "prefix": {"*": {"key": "prefix_key", "value": "prefix_value"}},
    # orthogonal and sparse high-rank methods; shira_indices is regenerated from the seed and checked
    "oft": {"*": {"oft_R": "oft_R.weight"}},
    "boft": {"*": {"boft_R": "boft_R", "boft_s": "boft_s"}},
    "hra": {"*": {"hra_u": "hra_u"}},
    "shira": {"*": {"shira_weight": "shira_weight", "shira_indices": "shira_indices"}},
    # -- spectral / budgeted / encoder methods (issue 16). None: a tensor PEFT files do not hold ("*": any other).
    # AdaLoRA: PEFT saves only the kept ranks (its config's rank_pattern), via the module's to_peft.
    "adalora": {"*": {"A": "lora_A", "E": "lora_E", "B": "lora_B", "rank_mask": None}},
    "fourierft": {"*": {"spectrum": "fourierft_spectrum", "indices": None}},  # indices: redrawn from the seed
    "vblora": {"*": {"logits_A": "vblora_logits_A", "logits_B": "vblora_logits_B",
                     "vector_bank": "vblora_vector_bank"}},
    # P-tuning: PEFT saves the encoder's output alone, as prompt tuning's table; the encoder is not saved.
    "p_tuning": {"*": {"embedding": "prompt_embeddings", "*": None}},
}
WHOLE_KEYS = {"prompt", "p_tuning"}  # methods whose PEFT keys stand alone, without the base_model.model. path
PROMPT_PREFIX = "base_model."  # prompt-style PEFT models wrap the model directly: their copies' keys
PROMPT_STYLE = {"prompt", "prefix", "p_tuning"}


def to_peft_shape(module, tensor: str, value):
    """The tensor as PEFT shapes it: IA3's vector is a column, or a row on feedforward sites ([1, C, 1, ...]
    on a conv, as DoRA's magnitude there); a module with `to_peft` says itself (AdaLoRA keeps the
    allocated ranks only, P-tuning saves its encoder's output)."""
    if hasattr(module, "to_peft"):
        return module.to_peft(tensor, value)
    if tensor in ("l", "magnitude") and getattr(module, "kernel_dims", 0):  # a conv's: [1, C, 1, ...]
        return value.reshape(1, -1, *[1] * module.kernel_dims)
    if tensor == "l" and hasattr(module, "feedforward"):
        return value.reshape(1, -1) if module.feedforward else value.reshape(-1, 1)
    return value


# `.base_layer` not directly before a LoRA tensor: there it tells nested ParamWrappers apart (two
# expert parameters of one module: `experts.base_layer.lora_A.weight` and `experts.lora_A.weight`).
WRAPPER_INFIX = re.compile(r"\.base_layer(?=\.)(?!(?:\.base_layer)*\.lora_)")


TOKEN_ADAPTER = "token_adapter"
LN_TUNING_INFIX = "ln_tuning_layers"  # PEFT's LN_TUNING keeps its trainable copy of the module there


def normalize(key: str) -> str:
    """A PEFT key without the wrapper infixes PEFT may or may not write (`base_layer.`, `modules_to_save.`,
    `token_adapter.`)."""
    return WRAPPER_INFIX.sub("", key).replace(".modules_to_save.", ".").replace(f".{TOKEN_ADAPTER}.", ".")


def peft_module_paths(cm) -> dict[str, str]:
    """Site path -> the module path PEFT's key uses, where the two differ:

    - an expert parameter: the module owning it, with one `base_layer.` per ParamWrapper PEFT nests
      around it (PEFT wraps a module's targeted parameters in registration order, the first innermost);
    - nn.MultiheadAttention's out_proj: PEFT wraps it inside the attention's own wrapper.
    """
    sites = {s.path: s for s in cm.sites}
    adapted = {(r.entry_index, p) for r in cm.records if r.method not in (None, "copy") for p in r.sites}
    order = {name: i for i, (name, _) in enumerate(cm.compilation.source.named_parameters(remove_duplicate=False))}
    out: dict[str, str] = {}
    for entry, path in adapted:
        site = sites.get(path)
        if site is None:
            continue
        if site.kind == "experts":
            owner = site.param.rpartition(".")[0]
            wrapped = sorted((sites[p].param for e, p in adapted if e == entry and p in sites
                              and sites[p].kind == "experts" and sites[p].param.rpartition(".")[0] == owner),
                             key=lambda name: order.get(name, 0))
            out[path] = owner + ".base_layer" * (len(wrapped) - 1 - wrapped.index(site.param))
        elif site.param == f"{site.module_path}.out_proj.weight" and (entry, site.module_path) in adapted:
            out[path] = f"{site.module_path}.base_layer.out_proj"
    return out


def is_unused_original(key: str) -> bool:
    """The original module PEFT keeps beside a modules_to_save copy; the forward pass never reads it."""
    return ".original_module." in key


def base_key(fqn: str, wrapped: set[str], prefix: str = PREFIX) -> str:
    """PEFT's key for a base parameter (a copy or an in-place trained one)."""
    owner, _, leaf = fqn.rpartition(".")
    return prefix + (f"{owner}.base_layer.{leaf}" if owner in wrapped else fqn)


def method_key(method: str, kind: str | None, site_path: str, tensor: str, name: str) -> str | None:
    """PEFT's key for an adapter tensor; None for a tensor PEFT files do not hold."""
    table = TENSOR_NAMES.get(method)
    if table is None:
        raise NotImplementedError(f"{name!r}: no PEFT tensor names for method {method!r}; "
                                  f"known: {sorted(TENSOR_NAMES)}")
    names = table.get(kind or "*", table["*"])
    if tensor not in names and "*" not in names:
        raise NotImplementedError(f"{name!r}: PEFT has no tensor for {method} {tensor!r}; known: {sorted(names)}")
    if names.get(tensor, names.get("*")) is None:
        return None
    if method in WHOLE_KEYS:
        return names[tensor]
    if not site_path:  # an entry-wide tensor (VeRA's projections)
        return f"base_model.{names[tensor]}"
    return f"{PREFIX}{site_path}.{names[tensor]}"


def peft_names(cm) -> dict[str, str]:
    """adapter_state_dict() name -> PEFT key, for every tensor the compiled model trains."""
    spec = cm.spec
    entry_of_slot = dict(zip(spec.entry_names(), spec.adapters))
    kinds = {site.path: site.kind for site in cm.sites}
    peft_paths = peft_module_paths(cm)
    modules = list(adapters.adapter_modules(cm.adapter_root))
    wrapped = {q.rpartition(".")[0] for q, _ in modules
               if entry_of_slot[q.rpartition(".")[2]].method not in ("copy", "ln_tuning")}
    prefix = PROMPT_PREFIX if any(e.method in PROMPT_STYLE for e in spec.adapters) else PREFIX
    # Tokens trained beside another method (LoRA's trainable_token_indices) sit in PEFT's token_adapter.
    beside = any(e.method not in ("copy", "trainable_tokens") for e in spec.adapters)
    out: dict[str, str] = {}
    not_in_peft: set[str] = set()
    for qualname, module in modules:
        site_path, _, slot = qualname.rpartition(".")
        method = entry_of_slot[slot].method
        for tensor in list(module._parameters) + list(module._buffers):
            name = f"{qualname}.{tensor}"
            if tensor in getattr(module, "not_in_peft", ()):  # derived from the spec or the base weight
                not_in_peft.add(name)
                continue
            if method == "trainable_tokens" and beside:
                out[name] = f"{PREFIX}{site_path}.{TOKEN_ADAPTER}.{TENSOR_NAMES[method]['*'][tensor]}"
            elif method == "ln_tuning":
                out[name] = f"{PREFIX}{site_path}.{LN_TUNING_INFIX}.{tensor}"
            elif method == "copy":
                out[name] = base_key(f"{site_path}.{tensor}".strip("."), wrapped, prefix)
            else:
                key = method_key(method, kinds.get(site_path), peft_paths.get(site_path, site_path), tensor, name)
                if key is None:
                    not_in_peft.add(name)
                else:
                    out[name] = key
    copied = set(out.values())
    for name in cm.adapter_state_dict():
        # A base parameter the spec's `trainable` unfreezes; where a copy replaces it, the copy is saved.
        if name not in out and name not in not_in_peft and base_key(name, wrapped, prefix) not in copied:
            out[name] = base_key(name, wrapped, prefix)
    return out
