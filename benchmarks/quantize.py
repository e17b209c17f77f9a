"""Quantized base (QLoRA-style) on CPU: accuracy, bytes, process memory, training-step time and peak memory.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantize.py [--steps 5] [--out benchmarks/quantize.json]

LLaMA-style config (random weights): hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4000.
LoRA r=16 on q/k/v/o. Memory and time are measured in a fresh subprocess per configuration,
so that each one's peak RSS is its own: fp32 base, int8, nf4 (peftc), and HF PEFT on the fp32
base and on a bitsandbytes 4-bit (nf4) base.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=4000, max_position_embeddings=256)
LORA = {"method": "lora", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 16, "alpha": 32}
QUANT = {"fp32": None, "int8": {"bits": 8}, "int4": {"bits": 4, "format": "int"}, "nf4": {"format": "nf4"},
         "nf4-dq": {"format": "nf4", "double_quant": True}}
BATCH, SEQ = 2, 64


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def batch(seed: int = 1) -> dict:
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM (the peak RSS) to the current RSS
        f.write("5")


# -- in the parent: accuracy and bytes ------------------------------------------------------
@torch.no_grad()
def accuracy() -> dict:
    import peftc
    model = build_model()
    x = batch()
    del x["labels"]
    ref = model(**x).logits
    out = {}
    for name, quantize in QUANT.items():
        if quantize is None:
            continue
        cm = peftc.compile(model, {"adapters": [LORA], "quantize": quantize}, example_kwargs=x)
        logits = cm(**x).logits
        cos = torch.nn.functional.cosine_similarity(logits.flatten().double(), ref.flatten().double(), dim=0)
        q = cm.report().to_dict()["totals"]["quantized_base"]
        out[name] = {"cosine": round(float(cos), 5),
                     "argmax_agreement": round(float((logits.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
                     "weights": q["weights"], "packed_bytes": q["bytes"], "fp32_bytes": q["fp32_bytes"],
                     "ratio_vs_fp32": round(q["ratio_vs_fp32"], 4),
                     "quantize_pass_s": round(cm.records[0].seconds, 3)}
        print(f"  {name:7s} {out[name]}", flush=True)
    return out


def bigram_batch(batch_size: int, seq: int, seed: int) -> torch.Tensor:
    """Sequences following t -> (5 t + 3) mod vocab: a task the model learns in a few dozen steps."""
    vocab = CONFIG["vocab_size"]
    start = torch.randint(0, vocab, (batch_size, 1), generator=torch.Generator().manual_seed(seed))
    steps = [start]
    for _ in range(seq - 1):
        steps.append((5 * steps[-1] + 3) % vocab)
    return torch.cat(steps, dim=1)


def trained_accuracy(steps: int = 60) -> dict:
    """Argmax agreement with the fp32 model after the fp32 model has learned the bigram task."""
    import peftc
    model = build_model().train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        x = bigram_batch(8, 32, seed=step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = bigram_batch(16, 32, seed=10_000)
    inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    out = {"train_steps": steps, "final_train_loss": round(float(loss.detach()), 4)}
    with torch.no_grad():
        ref = model(**inputs).logits
        out["fp32_next_token_accuracy"] = round(float((ref[:, :-1].argmax(-1) == x[:, 1:]).float().mean()), 4)
        for name in ("int8", "int4", "nf4"):
            cm = peftc.compile(model, {"adapters": [LORA], "quantize": QUANT[name]}, example_kwargs=inputs)
            logits = cm(**inputs).logits
            out[name] = {"argmax_agreement": round(float((logits.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
                         "cosine": round(float(torch.nn.functional.cosine_similarity(
                             logits.flatten().double(), ref.flatten().double(), dim=0)), 5)}
            print(f"  trained {name:5s} {out[name]}", flush=True)
    return out


@torch.no_grad()
def onnx_sizes(directory: str) -> dict:
    """ONNX file size with the base packed (MatMulNBits / MatMulBnb4 / DequantizeLinear) and ORT's error."""
    import onnxruntime as ort
    from peftc.codegen.onnx.quantized_linear import export

    import peftc
    model = build_model()
    x = batch()
    del x["labels"]
    out = {}
    for name in ("fp32", "int8", "int4", "nf4"):
        cm = peftc.compile(model, {"adapters": [LORA], "quantize": QUANT[name]}, example_kwargs=x)
        cm.eval()
        path = os.path.join(directory, f"{name}.onnx")
        export(cm.graph_module, (), path, kwargs={**x, "use_cache": False})
        session = ort.InferenceSession(path)
        feeds = {i.name: x[i.name].numpy() for i in session.get_inputs()}
        got = torch.from_numpy(session.run(None, feeds)[0])
        out[name] = {"file_mb": round(os.path.getsize(path) / 2**20, 2),
                     "ort_max_abs_diff": float((got - cm(**x).logits).abs().max())}
        print(f"  onnx {name:5s} {out[name]}", flush=True)
    return out


# -- in a child: process memory and training ------------------------------------------------
def warm_imports() -> None:
    """Import (and run once) everything a child uses before its baseline RSS: then deltas are the model's."""
    import peft  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftc  # noqa: F401
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=32))
    gc.collect()


def child_peftc(name: str, steps: int) -> dict:
    import peftc
    warm_imports()
    base_rss = rss_mb()
    model = build_model()
    model_rss = rss_mb()
    x = batch()
    spec = {"adapters": [LORA], "quantize": QUANT[name]}
    t0 = time.perf_counter()
    cm = peftc.compile(model, spec, example_kwargs=x)
    compile_s = time.perf_counter() - t0
    compiled_rss = rss_mb()
    del model
    gc.collect()
    freed_rss = rss_mb()
    result = {"model_mb": model_rss - base_rss, "after_compile_mb": compiled_rss - base_rss,
              "after_del_model_mb": freed_rss - base_rss, "compile_s": compile_s}
    return {**result, **train(cm, x, steps, base_rss)}


def child_hf(name: str, steps: int, model_dir: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    warm_imports()
    base_rss = rss_mb()
    if name == "hf-bnb-nf4":
        from transformers import BitsAndBytesConfig
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                   llm_int8_skip_modules=["lm_head"])
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, device_map="cpu",
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded_rss = rss_mb()
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"], lora_dropout=0.0)
    model = get_peft_model(model, config)
    gc.collect()
    return {"after_load_mb": loaded_rss - base_rss, "after_del_model_mb": rss_mb() - base_rss,
            **train(model, batch(), steps, base_rss)}


def train(module, x: dict, steps: int, base_rss: float) -> dict:
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    times, losses = [], []
    reset_peak_rss()
    before = rss_mb()
    for step in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        loss = module(**x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 2:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return {"step_s_median": statistics.median(times), "step_s_all": [round(t, 3) for t in times],
            "rss_before_train_mb": before - base_rss, "peak_rss_train_mb": rss_mb("VmHWM") - base_rss,
            "loss_first": losses[0], "loss_last": losses[-1]}


def step_timing(model_dir: str, rounds: int) -> dict:
    """Training-step time, all five set-ups in this one process, alternated round by round; medians."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import peftc
    x = batch()
    modules = {}
    for name in ("fp32", "int8", "nf4"):
        modules[f"peftc-{name}"] = peftc.compile(build_model(), {"adapters": [LORA], "quantize": QUANT[name]},
                                                 example_kwargs=x)
    lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"], lora_dropout=0.0)
    modules["hf-fp32"] = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                             llm_int8_skip_modules=["lm_head"])
    modules["hf-bnb-nf4"] = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, device_map="cpu", dtype=torch.float32), lora)
    optimizers = {}
    for name, module in modules.items():
        module.train()
        optimizers[name] = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    times: dict[str, list[float]] = {name: [] for name in modules}
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, module in modules.items():
            t0 = time.perf_counter()
            loss = module(**x).loss
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            if round_:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["peftc-fp32"])
    return {name: {"step_s_median": round(statistics.median(t), 4),
                   "vs_peftc_fp32": round(statistics.median(t) / base, 3)} for name, t in times.items()}


def run_child(kind: str, name: str, steps: int, model_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, name, "--steps", str(steps), "--model-dir", model_dir]
    # A fixed mmap threshold: every large tensor is its own mapping, returned to the OS when freed,
    # so peak RSS follows live tensors rather than glibc's heap growth.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, default=None)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--section", choices=("all", "trained", "train", "onnx"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        kind, name = args.child
        result = child_peftc(name, args.steps) if kind == "peftc" else child_hf(name, args.steps, args.model_dir)
        print(json.dumps(result))
        return
    results = {"config": CONFIG, "lora": LORA, "batch": [BATCH, SEQ], "torch": torch.__version__}
    if args.section in ("all", "onnx"):
        print("ONNX export with the base packed:", flush=True)
        with tempfile.TemporaryDirectory() as directory:
            results["onnx"] = onnx_sizes(directory)
        if args.section == "onnx":
            _write(results, args.out)
            return
    if args.section in ("all", "trained"):
        print("on a model that learned a task (full fine-tuning of the fp32 model first):", flush=True)
        results["trained_accuracy"] = trained_accuracy()
    if args.section == "trained":
        _write(results, args.out)
        return
    if args.section == "all":
        print("accuracy and bytes (logits vs the fp32 base, random weights):", flush=True)
        results["accuracy"] = accuracy()
    with tempfile.TemporaryDirectory() as model_dir:
        build_model().save_pretrained(model_dir)
        print("training-step time, alternated in one process:", flush=True)
        results["step_time"] = step_timing(model_dir, rounds=args.steps)
        print(f"  {results['step_time']}", flush=True)
        results["train"] = {}
        for kind, name in [("peftc", "fp32"), ("peftc", "int8"), ("peftc", "nf4"), ("hf", "hf-fp32"),
                           ("hf", "hf-bnb-nf4")]:
            results["train"][name] = run_child(kind, name, args.steps, model_dir)
            print(f"  train {name:10s} {results['train'][name]}", flush=True)
    try:
        import bitsandbytes
        results["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as err:
        results["bitsandbytes"] = f"not importable: {err}"
    _write(results, args.out)


def _write(results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
