"""serve_adapters' setup with non-LoRA PEFT folders: one shared capture store vs one per folder's compile.

    OMP_NUM_THREADS=1 python benchmarks/serving_setup.py [--repeats 2]

Non-LoRA folders (IA3, prompt, prefix) are each compiled on the base before serving
(peftc.serving.sources). "shared" is serve_adapters as it is: those compiles share one
CapturedGraphs(across_views=True), so a call is exported once per distinct superset call;
"per folder" gives every compilation its own store (what serve_adapters did before), so each
folder exports again. Both run in this process, alternated, medians; exports counted.
Then, on the shared model, the first call of a new signature (labels=) as a % of setup.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from common import llama_config, machine

import peftc
from peftc.capture.captured import CapturedGraphs
from peftc.serving import served

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from export_counter import counted_exports  # noqa: E402

BATCH, SEQ = 4, 16


def build():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(num_hidden_layers=2)).eval()


def save_folders(folder: Path) -> list[str]:
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    configs = {"ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
               "ia3v": IA3Config(target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"]),
               "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
               "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)}
    for name, config in configs.items():
        pm = get_peft_model(build(), config)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        pm.save_pretrained(folder / name)
    return list(configs)


def setup(folders: dict, inputs: dict, shared: bool):
    own_store = lambda across_views=False: CapturedGraphs()  # every compilation its own store: the old behaviour
    with counted_exports() as exports, mock.patch.object(served, "CapturedGraphs", CapturedGraphs if shared else own_store):
        start = time.perf_counter()
        mm = served.serve_adapters(build(), folders, example_kwargs=inputs)
        return mm, time.perf_counter() - start, len(exports)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    ids = torch.randint(0, llama_config().vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with tempfile.TemporaryDirectory() as tmp:
        names = save_folders(Path(tmp))
        folders = {name: Path(tmp) / name for name in names}
        times = {True: [], False: []}
        exports = {}
        for _ in range(args.repeats):
            for shared in (False, True):
                mm, seconds, exports[shared] = setup(folders, inputs, shared)
                times[shared].append(seconds)
        rows = ["ia3", "prompt", "ia3v", "prefix"]
        with torch.no_grad(), counted_exports() as new_exports:
            start = time.perf_counter()
            mm(**inputs, labels=ids, adapter_ids=rows)
            first_labels = time.perf_counter() - start
    print(f"# {machine()}; {len(names)} PEFT folders {names}, LLaMA hidden 512 x 2 layers, call {BATCH} x {SEQ}")
    before, after = statistics.median(times[False]), statistics.median(times[True])
    print(f"setup per folder store: {before:.1f} s, {exports[False]} exports")
    print(f"setup shared store:     {after:.1f} s, {exports[True]} exports  (ratio {after / before:.2f})")
    print(f"first labels= call on the served model: {first_labels:.1f} s = {100 * first_labels / after:.0f}% of setup, "
          f"{len(new_exports)} exports")


if __name__ == "__main__":
    _ = peftc  # the package under test, imported first as the other benchmarks do
    main()
