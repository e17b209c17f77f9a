"""The PEFT config rows: one per peft_type, reading a config into peftc spec entries.

Each row names the peftc method it needs (it lights up once that method is registered), the
config fields it maps, and a reader; WRITERS holds the inverses, per peftc method.
Adding a method is one row here plus its tensor names in peft_keys.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from peftc.errors import SpecError
from peftc.spec.methods import METHODS

from . import peft_targets as pt


@dataclass(frozen=True)
class PeftRow:
    peft_type: str
    method: str  # the peftc method that must exist for this row to work
    read: Callable[[dict], list[dict]]  # config -> spec entries (the method's, then copies)
    mapped: frozenset  # the config fields `read` consumes
    fixed: tuple = ()  # (field, value) pairs peftc accepts at that value only (PEFT's defaults)
    verified: bool = True  # False: mapping not yet checked against PEFT's outputs, so refused
    # The reader for a config that comes with its saved weights, where those hold less than the method
    # trains (P-tuning saves its encoder's output alone); None: `read`.
    read_saved: Callable[[dict], list[dict]] | None = None


def supported_types() -> list[str]:
    return [name for name, row in PEFT_TYPES.items() if row.method in METHODS and row.verified]


# -- shared pieces ---------------------------------------------------------------------------

def _targets(cfg: dict, field: str = "target_modules") -> list[str]:
    value = cfg.get(field)
    if value is None:
        raise SpecError(f"{field}: the config names no target modules; PEFT fills these in per model type, "
                        "so set them explicitly")
    if isinstance(value, str) and value.lower() == "all-linear":
        raise SpecError(f"{field}: 'all-linear' depends on the model; use peftc.from_peft(model, ...), which "
                        "resolves it, or list the module names")
    return pt.targets_from_peft(value, field, cfg.get("layers_to_transform"), cfg.get("layers_pattern"))


def _exclude(cfg: dict) -> list[str]:
    out = pt.targets_from_peft(cfg["exclude_modules"], "exclude_modules") if cfg.get("exclude_modules") else []
    return out + [pt.save_exclusion(name) for name in cfg.get("modules_to_save") or []]


def _copies(cfg: dict, entry: dict) -> list[dict]:
    """`copy` entries for modules_to_save and for bias ('all' / 'lora_only' style)."""
    out = []
    if cfg.get("modules_to_save"):
        out.append({"method": "copy", "targets": [pt.save_target(n) for n in cfg["modules_to_save"]]})
    bias = cfg.get("bias") or "none"
    if bias == "all":
        out.append({"method": "copy", "targets": ["re:.*"], "params": ["bias"]})
    elif bias.endswith("_only"):  # "lora_only", "vera_only", ...: the biases of the adapted modules
        copy = {"method": "copy", "targets": entry["targets"], "params": ["bias"]}
        if entry.get("exclude"):
            copy["exclude"] = entry["exclude"]
        out.append(copy)
    elif bias != "none":
        raise SpecError(f"bias: expected 'none', 'all' or '<method>_only', got {bias!r}")
    return out


COMMON = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                    "modules_to_save", "bias"})


# -- LoRA ------------------------------------------------------------------------------------

LORA_INITS = {True: "default", False: "default", "gaussian": "gaussian",  # False: random B, for tests
              "pissa": "pissa", "olora": "olora"}  # PEFT rewrites the base weight; peftc keeps it (see insert_lora)
PISSA_NITER = re.compile(r"pissa_niter_([0-9]+)")  # PEFT's PiSSA by randomized SVD, K subspace iterations


def read_lora(cfg: dict, saved: bool = False) -> list[dict]:
    entry = {"method": _lora_or_dora(cfg), "targets": _lora_targets(cfg), "r": cfg.get("r", 8),
             "alpha": cfg.get("lora_alpha", 8), "dropout": cfg.get("lora_dropout", 0.0)}
    if cfg.get("target_parameters"):  # PEFT's literal "name or .name suffix" rule on parameter FQNs
        entry["target_parameters"] = [pt.suffix_target(name) for name in cfg["target_parameters"]]
    exclude = _exclude(cfg)
    if exclude:
        entry["exclude"] = exclude
    if entry["method"] == "dora":
        return _dora_entry(cfg, entry)
    entry.update(rslora=bool(cfg.get("use_rslora", False)), **_lora_init(cfg, saved))
    if cfg.get("lora_bias"):
        entry["lora_bias"] = True
    tokens = _token_entries(cfg.get("trainable_token_indices"))
    for field in ("rank_pattern", "alpha_pattern"):  # same names in peftc's LoraConfig
        if cfg.get(field):
            entry[field] = {pt.pattern_key_from_peft(k): v for k, v in cfg[field].items()}
    return [entry] + tokens + _copies(cfg, entry)


def read_saved_lora(cfg: dict) -> list[dict]:
    return read_lora(cfg, saved=True)


def _lora_init(cfg: dict, saved: bool) -> dict:
    """init_lora_weights (and its loftq_config / corda_config / eva_config) as peftc's init fields."""
    init = cfg.get("init_lora_weights", True)
    niter = PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    if niter:
        return {"init": "pissa", "pissa_niter": int(niter.group(1))}
    if init == "loftq":
        loftq = cfg.get("loftq_config") or {}
        return {"init": "loftq", "loftq_bits": loftq.get("loftq_bits", 4), "loftq_iter": loftq.get("loftq_iter", 1)}
    if init == "corda":
        return {"init": "corda", "corda_method": _corda_method(cfg.get("corda_config") or {})}
    if init == "eva":
        # PEFT saves EVA's A with the weights and reloads them over a zero B: a saved EVA adapter is plain LoRA
        return {"init": "default"} if saved else _eva_init(cfg.get("eva_config") or {})
    if not isinstance(init, (bool, str)) or init not in LORA_INITS:
        raise SpecError(f"init_lora_weights: {init!r} is not mapped (peftc reads True, False, 'gaussian', 'pissa', "
                        "'pissa_niter_K', 'olora', 'loftq', 'corda' and 'eva'); convert the adapter to plain LoRA "
                        "first (PEFT's path_initial_model_for_weight_conversion)")
    return {"init": LORA_INITS[init]}


def _corda_method(corda: dict) -> str:
    for name in ("cache_file", "covariance_file"):
        if corda.get(name):
            raise SpecError(f"corda_config.{name}: peftc computes CorDA's covariance from the calibration data "
                            "(peftc.compile(..., calibration=batches)) and reads no cache file; remove it")
    if corda.get("use_float16_for_covariance"):
        raise SpecError("corda_config.use_float16_for_covariance: peftc keeps the covariance in float32; "
                        "set it to false")
    return corda.get("corda_method", "ipm")


def _eva_init(eva: dict) -> dict:
    if eva.get("whiten"):
        raise SpecError("eva_config.whiten: peftc's EVA does not whiten the components; set whiten to false")
    if eva.get("adjust_scaling_factors") is False:
        raise SpecError("eva_config.adjust_scaling_factors: peftc scales alpha with the EVA rank (PEFT's "
                        "default, which keeps alpha / r); set it to true")
    return {"init": "eva", "eva_rho": float(eva.get("rho", 2.0))}


def _token_entries(indices) -> list[dict]:
    """LoRA's trainable_token_indices ({embedding module name: token ids}) as trainable_tokens entries."""
    if not indices:
        return []
    if not isinstance(indices, dict):
        raise SpecError("trainable_token_indices: a bare list means the model's input embedding; use "
                        "peftc.from_peft(model, ...), which resolves it, or give {module name: ids}")
    return [{"method": "trainable_tokens", "targets": [pt.suffix_target(name)], "indices": list(ids)}
            for name, ids in indices.items()]


def read_ln_tuning(cfg: dict) -> list[dict]:
    entry = {"method": "ln_tuning", "targets": _targets(cfg)}
    exclude = _exclude(cfg)
    if exclude:
        entry["exclude"] = exclude
    return [entry] + _copies(cfg, entry)


def write_ln_tuning(entry, field: str) -> dict:
    if entry.params:
        raise SpecError(f"{field}.params: PEFT's LN_TUNING trains whole modules; leave params empty")
    targets = _write_targets(entry, field, layers=False)
    return {"peft_type": "LN_TUNING", **targets}


def read_trainable_tokens(cfg: dict) -> list[dict]:
    targets = _targets(cfg) if cfg.get("target_modules") else ["embed_tokens"]  # PEFT's default
    return [{"method": "trainable_tokens", "targets": targets, "indices": list(cfg.get("token_indices") or [])}]


def write_trainable_tokens(entry, field: str) -> dict:
    return {"peft_type": "TRAINABLE_TOKENS", "token_indices": list(entry.indices), "init_weights": True,
            "target_modules": pt.targets_to_peft(entry.targets, f"{field}.targets")}


def _lora_targets(cfg: dict) -> list[str]:
    """target_modules; with target_parameters (MoE experts) it may be empty or None."""
    if cfg.get("target_parameters") and not cfg.get("target_modules"):
        return []
    return _targets(cfg)


def _dora_entry(cfg: dict, entry: dict) -> list[dict]:
    """peftc's dora has LoRA's r, alpha, dropout but no rslora or per-module patterns."""
    for field in ("use_rslora", "rank_pattern", "alpha_pattern", "lora_bias"):
        if cfg.get(field):
            raise SpecError(f"{field}: peftc's dora method cannot express {field}={cfg[field]!r}; "
                            "save the DoRA adapter without it")
    return [entry] + _copies(cfg, entry)


def _lora_or_dora(cfg: dict) -> str:
    """use_dora=True is peftc's separate 'dora' method (same fields as LoRA, plus a magnitude vector)."""
    if not cfg.get("use_dora"):
        return "lora"
    if "dora" not in METHODS:
        raise SpecError(f"use_dora: DoRA adapters need peftc's 'dora' method, which this build lacks; "
                        f"supported: {supported_types()} without use_dora")
    return "dora"


def write_lora(entry, field: str) -> dict:
    init = _write_init(entry)
    rank_pattern = getattr(entry, "rank_pattern", {})
    alpha_pattern = getattr(entry, "alpha_pattern", {})
    return {
        "peft_type": "LORA", "r": entry.r, "lora_alpha": _number(entry.alpha),
        "lora_dropout": getattr(entry, "dropout", 0.0), "use_rslora": getattr(entry, "rslora", False),
        **init, "use_dora": False, "fan_in_fan_out": False,
        "lora_bias": getattr(entry, "lora_bias", False),
        "target_modules": pt.targets_to_peft(entry.targets, f"{field}.targets"),
        "exclude_modules": pt.targets_to_peft(getattr(entry, "exclude", ()), f"{field}.exclude"),
        "rank_pattern": {pt.pattern_key_to_peft(k): v for k, v in rank_pattern.items()},
        "alpha_pattern": {pt.pattern_key_to_peft(k): _number(v) for k, v in alpha_pattern.items()},
        "layers_to_transform": None, "layers_pattern": None, "bias": "none", "modules_to_save": None,
        **_write_target_parameters(entry, field),
    }


def _write_init(entry) -> dict:
    """init_lora_weights and its sub-config, as PEFT writes them."""
    init = getattr(entry, "init", "default")
    if init == "default":
        return {"init_lora_weights": True}
    if init == "pissa" and entry.pissa_niter:
        return {"init_lora_weights": f"pissa_niter_{entry.pissa_niter}"}
    if init == "loftq":
        return {"init_lora_weights": "loftq",
                "loftq_config": {"loftq_bits": entry.loftq_bits, "loftq_iter": entry.loftq_iter}}
    if init == "corda":
        return {"init_lora_weights": "corda", "corda_config": {"corda_method": entry.corda_method}}
    if init == "eva":
        return {"init_lora_weights": "eva", "eva_config": {"rho": entry.eva_rho, "whiten": False}}
    return {"init_lora_weights": init}


def _write_target_parameters(entry, field: str) -> dict:
    """PEFT fills in model-type defaults for target_modules=None; with parameters only, it must be []."""
    params = getattr(entry, "target_parameters", ())
    if not params:
        return {}
    if not all(pt.is_bare(p) for p in params):
        raise SpecError(f"{field}.target_parameters: PEFT matches parameter names as literal suffixes; "
                        f"{list(params)} has a glob or regex, list the names instead")
    return {"target_parameters": list(params), "target_modules": list(entry.targets) and
            pt.targets_to_peft(entry.targets, f"{field}.targets")}


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


# -- the other types: each checked against PeftModel (test_from_peft_matches_peft_for_non_lora_types) --

def read_ia3(cfg: dict) -> list[dict]:
    entry = {"method": "ia3", "targets": _targets(cfg)}
    exclude = _exclude(cfg)
    if exclude:
        entry["exclude"] = exclude
    if cfg.get("feedforward_modules"):
        entry["feedforward"] = pt.targets_from_peft(cfg["feedforward_modules"], "feedforward_modules")
    return [entry] + _copies(cfg, entry)


def read_loha(cfg: dict) -> list[dict]:
    return _low_rank("loha", cfg)


def read_lokr(cfg: dict) -> list[dict]:
    entries = _low_rank("lokr", cfg)
    entries[0].update(decompose_both=bool(cfg.get("decompose_both", False)),
                      decompose_factor=cfg.get("decompose_factor", -1),
                      rank_dropout_scale=bool(cfg.get("rank_dropout_scale", False)))
    return entries


def _low_rank(method: str, cfg: dict) -> list[dict]:
    """LoHa / LoKr: r, alpha (scale alpha/r), rank and module dropout."""
    entry = {"method": method, "targets": _targets(cfg), "r": cfg.get("r", 8), "alpha": cfg.get("alpha", 8),
             "rank_dropout": cfg.get("rank_dropout", 0.0), "module_dropout": cfg.get("module_dropout", 0.0),
             "use_effective_conv2d": bool(cfg.get("use_effective_conv2d", False))}
    exclude = _exclude(cfg)
    if exclude:
        entry["exclude"] = exclude
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise SpecError(f"{field}: peftc's {method} has one r and alpha per entry; PEFT's {field} is not "
                            "supported for it")
    return [entry] + _copies(cfg, entry)


def read_vera(cfg: dict) -> list[dict]:
    entry = {"method": "vera", "targets": _targets(cfg), "r": cfg.get("r", 256),
             "seed": cfg.get("projection_prng_key", 0), "dropout": cfg.get("vera_dropout", 0.0),
             "d_initial": cfg.get("d_initial", 0.1)}
    exclude = _exclude(cfg)
    if exclude:
        entry["exclude"] = exclude
    return [entry] + _copies(cfg, entry)


def read_prompt(cfg: dict) -> list[dict]:
    """An encoder-decoder's (SEQ_2_SEQ_LM, 2 submodules) too: PEFT's prompt tuning prepends the first N rows of
    its table at the encoder, as peftc's prompt does (from_peft reads those rows: encoder_prompt_rows)."""
    if (cfg.get("num_transformer_submodules") or 1) != 1 and not is_seq2seq_prompt(cfg):
        raise SpecError(f"num_transformer_submodules: peftc prompt tuning prepends at one token embedding; "
                        f"{cfg['num_transformer_submodules']} (an encoder-decoder) is not supported")
    return [{"method": "prompt", "num_tokens": cfg["num_virtual_tokens"]}] + _saved_copies(cfg)


def is_seq2seq_prompt(cfg: dict) -> bool:
    """PEFT's encoder-decoder prompt tuning: a table of 2N rows, the encoder's first."""
    return (cfg.get("peft_type") == "PROMPT_TUNING" and cfg.get("task_type") == "SEQ_2_SEQ_LM"
            and (cfg.get("num_transformer_submodules") or 1) == 2)


def read_prefix(cfg: dict) -> list[dict]:
    if cfg.get("prefix_projection"):
        raise SpecError("prefix_projection: peftc prefix tuning loads the projected prefix only; save the "
                        "adapter without the projection MLP")
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise SpecError(f"num_transformer_submodules: peftc prefix tuning of an encoder-decoder "
                        f"({cfg['num_transformer_submodules']}) is not supported")
    return [{"method": "prefix", "num_tokens": cfg["num_virtual_tokens"]}] + _saved_copies(cfg)


def _saved_copies(cfg: dict) -> list[dict]:
    """Prompt-style types train only modules_to_save besides the prompt (PEFT adds the head for SEQ_CLS)."""
    names = list(dict.fromkeys(cfg.get("modules_to_save") or []))
    return [{"method": "copy", "targets": [pt.save_target(n) for n in names]}] if names else []


# -- orthogonal and sparse high-rank types (OFT, BOFT, HRA, SHiRA) ------------------------------

def read_oft(cfg: dict) -> list[dict]:
    return _with_targets(cfg, {
        "method": "oft", "r": cfg.get("r", 0), "block_size": cfg.get("oft_block_size", 32),
        "module_dropout": cfg.get("module_dropout", 0.0), "coft": bool(cfg.get("coft", False)),
        "eps": cfg.get("eps", 6e-5), "block_share": bool(cfg.get("block_share", False)),
        "cayley_neumann": bool(cfg.get("use_cayley_neumann", True)),
        "neumann_terms": cfg.get("num_cayley_neumann_terms", 5)})


def read_boft(cfg: dict) -> list[dict]:
    return _with_targets(cfg, {
        "method": "boft", "block_size": cfg.get("boft_block_size", 4), "block_num": cfg.get("boft_block_num", 0),
        "n_butterfly_factor": cfg.get("boft_n_butterfly_factor", 1), "dropout": cfg.get("boft_dropout", 0.0)})


def read_hra(cfg: dict) -> list[dict]:
    return _with_targets(cfg, {"method": "hra", "r": cfg.get("r", 8), "gram_schmidt": bool(cfg.get("apply_GS", False))})


def read_shira(cfg: dict) -> list[dict]:
    return _with_targets(cfg, {"method": "shira", "r": cfg.get("r", 32), "mask_type": cfg.get("mask_type", "random"),
                               "seed": cfg.get("random_seed")})


def _with_targets(cfg: dict, entry: dict) -> list[dict]:
    entry["targets"] = _targets(cfg)
    exclude = _exclude(cfg)
    if exclude:
        entry["exclude"] = exclude
    return [entry] + _copies(cfg, entry)


ORTHOGONAL_TYPES = {
    "OFT": PeftRow("OFT", "oft", read_oft, COMMON | {"r", "oft_block_size", "module_dropout", "coft", "eps",
                                                     "block_share", "use_cayley_neumann", "num_cayley_neumann_terms",
                                                     "init_weights"}),
    "BOFT": PeftRow("BOFT", "boft", read_boft, COMMON | {"boft_block_size", "boft_block_num", "boft_n_butterfly_factor",
                                                         "boft_dropout", "init_weights"}),
    "HRA": PeftRow("HRA", "hra", read_hra, COMMON | {"r", "apply_GS", "init_weights"}),
    "SHIRA": PeftRow("SHIRA", "shira", read_shira, COMMON | {"r", "mask_type", "random_seed", "init_weights"}),
}


def write_oft(entry, field: str) -> dict:
    return {"peft_type": "OFT", "r": entry.r, "oft_block_size": entry.block_size,
            "module_dropout": entry.module_dropout, "coft": entry.coft, "eps": entry.eps,
            "block_share": entry.block_share, "use_cayley_neumann": entry.cayley_neumann,
            "num_cayley_neumann_terms": entry.neumann_terms, "init_weights": True, "bias": "none",
            **_write_targets(entry, field)}


def write_boft(entry, field: str) -> dict:
    return {"peft_type": "BOFT", "boft_block_size": entry.block_size, "boft_block_num": entry.block_num,
            "boft_n_butterfly_factor": entry.n_butterfly_factor, "boft_dropout": entry.dropout,
            "init_weights": True, "bias": "none", **_write_targets(entry, field)}


def write_hra(entry, field: str) -> dict:
    return {"peft_type": "HRA", "r": entry.r, "apply_GS": entry.gram_schmidt, "init_weights": True, "bias": "none",
            **_write_targets(entry, field)}


def write_shira(entry, field: str) -> dict:
    """PEFT's ShiraConfig has no exclude_modules or layer selection: the targets must say it all."""
    if getattr(entry, "exclude", ()):
        raise SpecError(f"{field}.exclude: PEFT's SHiRA has no exclude_modules; list the targets instead")
    return {"peft_type": "SHIRA", "r": entry.r, "mask_type": entry.mask_type, "random_seed": entry.seed,
            "init_weights": True, "target_modules": pt.targets_to_peft(entry.targets, f"{field}.targets"),
            "modules_to_save": None}


ORTHOGONAL_WRITERS = {"oft": write_oft, "boft": write_boft, "hra": write_hra, "shira": write_shira}


# -- spectral / budgeted / encoder methods (issue 16) ---------------------------------------

ADALORA_FIELDS = ("total_step", "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                  "orth_reg_weight")


def read_adalora(cfg: dict) -> list[dict]:
    """PEFT's `r` is ignored by AdaLoRA (init_r is the rank); rank_pattern keys are `<module>.lora_E`."""
    entry = {"method": "adalora", "alpha": cfg.get("lora_alpha", 8),
             "dropout": cfg.get("lora_dropout", 0.0)}
    entry.update({f: cfg[f] for f in ADALORA_FIELDS if cfg.get(f) is not None})
    if cfg.get("rank_pattern"):
        entry["rank_pattern"] = {_rank_pattern_site(k): v for k, v in cfg["rank_pattern"].items()}
    return _with_targets(cfg, entry)


def _rank_pattern_site(key: str) -> str:
    path = key.removesuffix(".default")
    return path.removesuffix(".lora_E")


def write_adalora(entry, field: str) -> dict:
    """rank_pattern is filled in by save_peft from the compiled model's allocation (a spec has none yet)."""
    return {"peft_type": "ADALORA", "r": 8, "lora_alpha": _number(entry.alpha), "lora_dropout": entry.dropout,
            **{f: getattr(entry, f) for f in ADALORA_FIELDS}, "init_lora_weights": True,
            "rank_pattern": {f"{path}.lora_E": list(mask) for path, mask in entry.rank_pattern.items()} or None,
            "bias": "none", "fan_in_fan_out": False, **_write_targets(entry, field)}


def read_fourierft(cfg: dict) -> list[dict]:
    if cfg.get("n_frequency_pattern"):
        raise SpecError("n_frequency_pattern: peftc's fourierft has one n_frequency per entry; split the "
                        "targets into entries instead")
    return _with_targets(cfg, {
        "method": "fourierft", "n_frequency": cfg.get("n_frequency", 1000), "scaling": cfg.get("scaling", 150.0),
        "random_loc_seed": cfg.get("random_loc_seed", 777), "init": "zeros" if cfg.get("init_weights") else "random"})


def write_fourierft(entry, field: str) -> dict:
    return {"peft_type": "FOURIERFT", "n_frequency": entry.n_frequency, "scaling": _number(entry.scaling),
            "random_loc_seed": entry.random_loc_seed, "init_weights": entry.init == "zeros",
            "n_frequency_pattern": {}, "bias": "none", "fan_in_fan_out": False, **_write_targets(entry, field)}


VBLORA_FIELDS = ("r", "num_vectors", "vector_length", "topk", "init_vector_bank_bound", "init_logits_std",
                 "save_only_topk_weights")


def read_vblora(cfg: dict) -> list[dict]:
    entry = {"method": "vblora", "dropout": cfg.get("vblora_dropout", 0.0)}
    entry.update({f: cfg[f] for f in VBLORA_FIELDS if cfg.get(f) is not None})
    return _with_targets(cfg, entry)


def write_vblora(entry, field: str) -> dict:
    return {"peft_type": "VBLORA", **{f: getattr(entry, f) for f in VBLORA_FIELDS},
            "vblora_dropout": entry.dropout, "bias": "none", "fan_in_fan_out": False,
            **_write_targets(entry, field)}


P_TUNING_FIELDS = ("encoder_hidden_size", "num_virtual_tokens", "encoder_reparameterization_type",
                   "encoder_num_layers", "encoder_dropout")


def read_p_tuning(cfg: dict) -> list[dict]:
    """A fresh P-tuning entry (encoder and all), for a config alone."""
    _one_submodule(cfg)
    if not cfg.get("encoder_hidden_size"):
        raise SpecError("encoder_hidden_size: the config sets none; PEFT's PromptEncoder needs it too")
    return [{"method": "p_tuning", **{f: cfg[f] for f in P_TUNING_FIELDS if cfg.get(f) is not None}}] \
        + _saved_copies(cfg)


def read_saved_p_tuning(cfg: dict) -> list[dict]:
    """A saved P-tuning adapter holds the encoder's output alone (prompt_embeddings), which is what
    PeftModel.from_pretrained prepends: a prompt-tuning entry computes exactly that."""
    _one_submodule(cfg)
    return [{"method": "prompt", "num_tokens": cfg["num_virtual_tokens"]}] + _saved_copies(cfg)


def _one_submodule(cfg: dict) -> None:
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise SpecError(f"num_transformer_submodules: peftc prepends virtual tokens at one token embedding; "
                        f"{cfg['num_transformer_submodules']} (an encoder-decoder) is not supported")


def write_p_tuning(entry, field: str) -> dict:
    """token_dim and task_type depend on the model: save_peft fills them in."""
    return {"peft_type": "P_TUNING", **{f: getattr(entry, f) for f in P_TUNING_FIELDS},
            "num_transformer_submodules": 1, "modules_to_save": None}



PROMPT_FIELDS = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                           "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                           "tokenizer_kwargs", "encoder_hidden_size", "prefix_projection", "init_weights",
                           "modules_to_save"})

PEFT_TYPES: dict[str, PeftRow] = {
    "LORA": PeftRow("LORA", "lora", read_lora, COMMON | {
        "r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "rank_pattern", "alpha_pattern",
        "use_dora", "target_parameters", "lora_bias", "trainable_token_indices", "loftq_config", "corda_config",
        "eva_config"}, read_saved=read_saved_lora),
    "IA3": PeftRow("IA3", "ia3", read_ia3, COMMON | {"feedforward_modules", "init_ia3_weights"}),
    "LOHA": PeftRow("LOHA", "loha", read_loha, COMMON | {"r", "alpha", "init_weights", "rank_pattern",
                                                         "alpha_pattern", "rank_dropout", "module_dropout",
                                                         "use_effective_conv2d"}),
    "LOKR": PeftRow("LOKR", "lokr", read_lokr, COMMON | {"r", "alpha", "init_weights", "rank_pattern",
                                                         "alpha_pattern", "decompose_both", "decompose_factor",
                                                         "rank_dropout", "module_dropout", "rank_dropout_scale",
                                                         "use_effective_conv2d"}),
    "VERA": PeftRow("VERA", "vera", read_vera, COMMON | {"r", "init_weights", "projection_prng_key",
                                                         "save_projection", "vera_dropout", "d_initial"}),
    "PROMPT_TUNING": PeftRow("PROMPT_TUNING", "prompt", read_prompt, PROMPT_FIELDS),
    "PREFIX_TUNING": PeftRow("PREFIX_TUNING", "prefix", read_prefix, PROMPT_FIELDS),
    **ORTHOGONAL_TYPES,
    # -- spectral / budgeted / encoder methods (issue 16)
    "ADALORA": PeftRow("ADALORA", "adalora", read_adalora, COMMON | set(ADALORA_FIELDS) | {
        "r", "lora_alpha", "lora_dropout", "rank_pattern"}, (("init_lora_weights", True),)),
    "FOURIERFT": PeftRow("FOURIERFT", "fourierft", read_fourierft, COMMON | {
        "n_frequency", "scaling", "random_loc_seed", "init_weights", "n_frequency_pattern"}),
    "VBLORA": PeftRow("VBLORA", "vblora", read_vblora, COMMON | set(VBLORA_FIELDS) | {"vblora_dropout"}),
    "P_TUNING": PeftRow("P_TUNING", "p_tuning", read_p_tuning, PROMPT_FIELDS | set(P_TUNING_FIELDS),
                        read_saved=read_saved_p_tuning),
    "LN_TUNING": PeftRow("LN_TUNING", "ln_tuning", read_ln_tuning,
                         frozenset({"target_modules", "exclude_modules", "modules_to_save"})),
    "TRAINABLE_TOKENS": PeftRow("TRAINABLE_TOKENS", "trainable_tokens", read_trainable_tokens,
                                frozenset({"target_modules", "token_indices", "init_weights"})),
}


def write_dora(entry, field: str) -> dict:
    return {**write_lora(entry, field), "use_dora": True}


def _write_targets(entry, field: str, layers: bool = True) -> dict:
    out = {"target_modules": pt.targets_to_peft(entry.targets, f"{field}.targets"),
           "exclude_modules": pt.targets_to_peft(getattr(entry, "exclude", ()), f"{field}.exclude"),
           "modules_to_save": None}
    return {**out, "layers_to_transform": None, "layers_pattern": None} if layers else out


def write_ia3(entry, field: str) -> dict:
    feedforward = pt.targets_to_peft(entry.feedforward, f"{field}.feedforward") if entry.feedforward else None
    return {"peft_type": "IA3", **_write_targets(entry, field, layers=False), "feedforward_modules": feedforward,
            "init_ia3_weights": True, "fan_in_fan_out": False}


def write_loha(entry, field: str) -> dict:
    return _write_low_rank("LOHA", entry, field)


def write_lokr(entry, field: str) -> dict:
    return {**_write_low_rank("LOKR", entry, field), "decompose_both": entry.decompose_both,
            "decompose_factor": entry.decompose_factor, "rank_dropout_scale": entry.rank_dropout_scale}


def _write_low_rank(peft_type: str, entry, field: str) -> dict:
    if entry.dropout:
        raise SpecError(f"{field}.dropout: PEFT's {peft_type} has no input dropout (only rank and module "
                        f"dropout); set dropout to 0 to save it for PEFT")
    return {"peft_type": peft_type, "r": entry.r, "alpha": _number(entry.alpha), "rank_dropout": entry.rank_dropout,
            "module_dropout": entry.module_dropout, "init_weights": True,
            "use_effective_conv2d": entry.use_effective_conv2d,
            "rank_pattern": {}, "alpha_pattern": {}, **_write_targets(entry, field)}


def write_vera(entry, field: str) -> dict:
    """The projections are saved too (save_projection), so PEFT need not redraw them."""
    if getattr(entry, "exclude", ()):
        raise SpecError(f"{field}.exclude: PEFT's VeRA has no exclude_modules; list the targets instead")
    targets = _write_targets(entry, field)
    del targets["exclude_modules"]
    return {"peft_type": "VERA", "r": entry.r, "projection_prng_key": entry.seed, "save_projection": True,
            "vera_dropout": entry.dropout, "d_initial": entry.d_initial, "init_weights": True,
            "fan_in_fan_out": False, "bias": "none", **targets}


def write_prompt(entry, field: str) -> dict:
    """token_dim and task_type depend on the model: save_peft fills them in; PEFT fills layers and heads."""
    return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": entry.num_tokens, "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM", "modules_to_save": None}


def write_prefix(entry, field: str) -> dict:
    """token_dim and task_type are filled in by save_peft (the table's width); PEFT fills layers and heads."""
    if entry.gate:
        raise SpecError(f"{field}.gate: PEFT's prefix tuning has no gate; set gate to false to save it for PEFT")
    return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": entry.num_tokens, "num_transformer_submodules": 1,
            "prefix_projection": False, "modules_to_save": None}


WRITERS: dict[str, Callable[[Any, str], dict]] = {"lora": write_lora, "dora": write_dora, "ia3": write_ia3,
                                                  "loha": write_loha, "lokr": write_lokr, "vera": write_vera,
                                                  "prompt": write_prompt, "prefix": write_prefix,
                                                  **ORTHOGONAL_WRITERS,
                                                  # -- spectral / budgeted / encoder methods (issue 16)
                                                  "adalora": write_adalora, "fourierft": write_fourierft,
                                                  "vblora": write_vblora, "p_tuning": write_p_tuning,
                                                  "trainable_tokens": write_trainable_tokens,
                                                  "ln_tuning": write_ln_tuning}
