"""An out-of-memory in evaluation halves the batch and goes on (issue 25), proven with allocations that truly
fail: the evaluation runs in a child process whose address space is capped (RLIMIT_AS) a little above what it
holds, so a batch's logits cannot be allocated whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

CHILD = r"""
import json, resource, sys
from pathlib import Path

root = Path(sys.argv[1])
from lorafit.core import libs
libs.prepare()
import torch
from transformers import LlamaForCausalLM, TrainingArguments

from lorafit.recipe import validate_recipe
from lorafit.core import models
from lorafit.stages.data import build_datasets
from lorafit.stages.evaluate import evaluate_model
from lorafit.stages.inject import inject_lora
from lorafit.stages.train import build_trainer
from lorafit.tools.tiny import build_tokenizer, tiny_config

# A tiny Llama with a 50,000-token vocabulary: one row's logits are megabytes, a batch's hundreds of them.
base = root / "base"
tokenizer = build_tokenizer("llama")
torch.manual_seed(0)
LlamaForCausalLM(tiny_config("llama", 50_000)).save_pretrained(base)
tokenizer.save_pretrained(base)
row = {"prompt": "The quick brown fox jumps over the lazy dog. " * 4, "completion": " Count to five: one two three."}
data = root / "rows.jsonl"
data.write_text((json.dumps(row) + "\n") * 16)  # identical rows: the mean loss is the same in any batching

recipe = validate_recipe({"model": {"name": str(base)}, "lora": {"r": 4, "target_modules": ["q_proj"]},
                          "data": {"train": str(data), "format": "completion", "eval_fraction": 0},
                          "evaluation": {"metrics": False, "batch_size": 16}})
tok = models.load_tokenizer(recipe.model)
bundle = build_datasets(recipe.data, tok, "causal_lm")
model, _ = inject_lora(LlamaForCausalLM.from_pretrained(base), recipe.lora, "causal_lm", model_name=str(base))
args = TrainingArguments(output_dir=str(root / "scratch"), per_device_eval_batch_size=16, report_to=[],
                         disable_tqdm=True, remove_unused_columns=False, use_cpu=True, save_strategy="no")
trainer = build_trainer(model, args, bundle.collator)
rows = bundle.train
logits_per_row = max(len(x) for x in rows["input_ids"]) * 50_000 * 4


def address_space():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024


trainer.args.per_device_eval_batch_size = 1
evaluate_model(trainer, rows.select(range(2)), recipe.evaluation)  # everything lazy is loaded and allocated once
trainer.args.per_device_eval_batch_size = 16
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
# Room for the logits of about 5 rows (and their loss): a batch of 16 cannot be allocated, one of 4 can.
resource.setrlimit(resource.RLIMIT_AS, (address_space() + 5 * 3 * logits_per_row, hard))
limited = evaluate_model(trainer, rows, recipe.evaluation)
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
free = evaluate_model(trainer, rows, recipe.evaluation)
print(json.dumps({"limited": limited, "free": free, "batch_after": trainer.args.per_device_eval_batch_size}))
"""


def test_an_out_of_memory_in_evaluation_halves_the_batch_and_goes_on(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    halved = [line for line in proc.stderr.splitlines() if "out of memory" in line]
    assert halved and "batch size 16" in halved[0] and "again at 8" in halved[0], proc.stderr[-3000:]
    limited, free = found["limited"], found["free"]
    assert limited["eval_rows"] == free["eval_rows"] == 16
    for key in ("eval_loss", "base_eval_loss"):
        assert abs(limited[key] - free[key]) <= 1e-5 * abs(free[key]), (key, limited, free)
    assert found["batch_after"] == 16  # the recipe's batch size is the next evaluation's again
