"""Peak RSS of `lorafit merge` in normal and --low-memory mode on a model of a few hundred MB.

    .venv/bin/python benchmarks/merge_memory.py [--work DIR] [--layers 8] [--hidden 1024]

Builds a random llama-shaped model (fp32 on disk), a peft adapter on all linear layers, then runs the
real CLI once per mode in a fresh process and reads that process's peak RSS (ru_maxrss). Also runs
`python -c "import torch, transformers, peft"` for the floor every mode pays.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024, time.perf_counter() - t


def build(work: Path, layers: int, hidden: int) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorafit.tools.tiny import build_tiny_model

    base = build_tiny_model(work / "base", "llama", hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                            num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                            head_dim=64)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(work / "adapter")
    return base, work / "adapter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-shard-size", default="100MB")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="lorafit-merge-bench-"))
    base, adapter = build(work, args.layers, args.hidden)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e6
    print(f"base: {size:.0f} MB fp32 on disk ({args.layers} layers, hidden {args.hidden}); merge to {args.dtype}, "
          f"shards of {args.max_shard_size}")
    floor, _ = peak_rss_mb([sys.executable, "-c", "import torch, transformers, peft, safetensors"])
    print(f"  imports only           : {floor:7.0f} MB peak RSS")
    lorafit = [sys.executable, "-m", "lorafit", "merge", str(adapter), "--dtype", args.dtype,
               "--max-shard-size", args.max_shard_size]
    for label, extra in (("normal", []), ("--low-memory", ["--low-memory"])):
        out = work / f"out{'-low' if extra else ''}"
        rss, secs = peak_rss_mb([*lorafit, "--output", str(out), "--force", *extra])
        print(f"  {label:<23}: {rss:7.0f} MB peak RSS ({rss - floor:+.0f} MB over imports), {secs:.1f} s")


if __name__ == "__main__":
    main()
