"""Measure the activation model of ``lorafit estimate`` against a real training step on CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/activation_memory.py [--json]

Each case runs in a fresh process (with glibc's mmap threshold pinned, so freed tensors leave the
resident set at once). After one warm-up step, the peak resident memory of a second forward +
backward (/proc/self/status VmHWM, reset through /proc/self/clear_refs) minus the resident memory
before it is what the step needed: activations plus LoRA gradients. The estimate predicts the same
quantity as ``activations + gradients`` of its CPU plan (fp32). Linux only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name → (family, config overrides): tiny is lorafit.tools.tiny's llama; small is a 4-layer, 45 M param llama.
MODELS = {
    "tiny-llama": ("llama", 384, {}),
    "small-llama-45M": ("llama", 32000, dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                             num_attention_heads=8, num_key_value_heads=4, head_dim=64)),
    "tiny-gpt2": ("gpt2", 384, {}),
}
CASES = [
    # model, batch, seq, gradient checkpointing, target_modules
    ("tiny-llama", 2, 256, False, "all-linear"),
    ("tiny-llama", 2, 256, True, "all-linear"),
    ("small-llama-45M", 2, 256, False, "all-linear"),
    ("small-llama-45M", 2, 256, True, "all-linear"),
    ("small-llama-45M", 4, 512, False, "attention"),
    ("tiny-gpt2", 2, 256, False, "all-linear"),
]


def _config(model: str):
    from lorafit.tools.tiny import tiny_config

    family, vocab, overrides = MODELS[model]
    return tiny_config(family, vocab, **overrides)


def _rss() -> dict:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def predict(model: str, batch: int, seq: int, gc: bool, targets: str, r: int = 16, dropout: float = 0.05) -> dict:
    """What the estimate says: activations + gradients in the CPU (fp32) plan."""
    from lorafit.core import memory as E
    from lorafit.core import targets as T
    from lorafit.recipe import LoraSpec

    cfg = _config(model)
    lora = LoraSpec(r=r, dropout=dropout, target_modules=targets)
    meta = T.build_meta_model(cfg)
    keys, chosen = T.resolve_targets(meta, targets)
    count = T.count_trainable(meta, chosen, r=r)
    act = E.trace_activations(cfg, "causal_lm", lora, keys, batch=batch, seq=seq, dtype="float32",
                              gradient_checkpointing=gc)
    return {"activations": act["peak_bytes"], "gradients": count.trainable * 4,
            "predicted": act["peak_bytes"] + count.trainable * 4}


def measure_here(model: str, batch: int, seq: int, gc: bool, targets: str, r: int = 16,
                 dropout: float = 0.05) -> dict:
    """One real step on CPU in this process: bytes the forward + backward needed above the resting state."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from lorafit.core import targets as T

    torch.manual_seed(0)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    cfg = _config(model)
    base = tf.AutoModelForCausalLM.from_config(cfg)
    keys, _ = T.resolve_targets(base, targets)
    if gc:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                 target_modules=keys, task_type="CAUSAL_LM"))
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))

    def step():
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer states, kernels, allocator
    results = []
    for _ in range(2):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss()["VmRSS"]
        loss = peft_model(input_ids=ids, labels=ids).loss  # as Trainer: the outputs (logits) are dropped
        loss.backward()
        peak = _rss()["VmHWM"]
        opt.zero_grad(set_to_none=True)
        del loss
        results.append(peak - before)
    return {"measured": min(results), "measured_runs": results}


def measure_cases(cases: list) -> list[dict]:
    """Measure *cases* in one fresh process (mmap threshold pinned): a dict per case."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import activation_memory as a; "
            f"print(json.dumps([a.measure_here(*c) for c in {[list(c) for c in cases]!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cases(cases: list) -> list[dict]:
    """Predicted vs measured per case; error = predicted / measured − 1."""
    rows = []
    for case, measured in zip(cases, measure_cases(cases)):
        pred = predict(*case)
        model, batch, seq, gc, targets = case
        rows.append({"model": model, "batch": batch, "seq": seq, "gradient_checkpointing": gc, "targets": targets,
                     **pred, **measured, "error": pred["predicted"] / measured["measured"] - 1})
    return rows


def main() -> None:
    rows = run_cases(CASES)
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':<16} {'b':>2} {'seq':>4} {'gc':>3} {'targets':<10} {'predicted':>11} {'measured':>11} {'error':>7}")
    for r in rows:
        print(f"{r['model']:<16} {r['batch']:>2} {r['seq']:>4} {'on' if r['gradient_checkpointing'] else 'off':>3} "
              f"{r['targets']:<10} {r['predicted'] / 2**20:>9.1f}MB {r['measured'] / 2**20:>9.1f}MB {r['error']:>+7.1%}")


if __name__ == "__main__":
    main()
