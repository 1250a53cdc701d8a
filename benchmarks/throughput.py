"""Training throughput: lorafit against the scripts it replaces, side by side in one process tree.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/throughput.py [--quick] [--workdir DIR] [--output FILE]

Every contender trains the same Llama-shaped model (random weights: hidden 256, 4 layers by default, --hidden and
--layers to change; LoRA r=16 on all
seven projections) for one epoch on the same rows (log-normal lengths, median ~60 tokens, a tail to ~750,
truncated at max_length 512), batch 8, fp32, seed 42, with the same prompt template (the rows are rendered
to plain text once, here, and every contender trains on that text). Each runs in its own subprocess, one
after another:

  peft-script   what the PEFT docs teach: AutoModelForCausalLM + LoraConfig + get_peft_model + Trainer,
                padding="max_length", DataCollatorForLanguageModeling  (the baseline, 1.0×)
  trl           TRL's SFTTrainer, default settings (skipped with a note when trl is not installed)
  trl-packing   SFTTrainer with packing=True (best-fit packing, padding-free)
  ideal         the same model on the same number of tokens in equal-length rows, zero padding: the ceiling
  lorafit       `lorafit train` (the CLI, default settings: length-grouped batches, dynamic padding)
  lorafit-packing   `lorafit train --set data.packing=true`

Reported per contender: train tokens/s (non-pad tokens trained per second of training), whole-process wall
time (start-up, import, load and tokenisation included), peak RSS of the process, final eval loss on the same
held-out rows; and every ratio against peft-script. lorafit's evaluation extras (base-model loss, generation
metrics) are switched off so that every contender evaluates once, the same way. --quick: 64 rows, to check
that everything runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTENDERS = ["peft-script", "trl", "trl-packing", "ideal", "lorafit", "lorafit-packing"]
MAX_LENGTH, BATCH, LR, SEED = 512, 8, 2e-4, 42
TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n{output}"  # short: rows of ~60 tokens stay possible
WORDS = ("the quick brown fox jumps over lazy dog what is capital of france paris two plus four colour blue red "
         "green yellow count one three five six seven eight nine ten weather sunny today movie great waiting "
         "terrible answer question summary story small model learns").split()
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------- set-up


def build_model(out: Path, hidden: int = 256, layers: int = 4) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafit.tools.tiny import build_tokenizer

    tok = build_tokenizer("llama")
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 43 // 16,  # 688 at 256
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def build_data(out: Path, rows: int, model_dir: Path) -> dict:
    """rows texts (the template filled in) whose token counts are log-normal: median ~60, tail to ~750."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rnd = random.Random(SEED)
    texts = []
    header = len(tok(TEMPLATE.format(instruction="", output=""))["input_ids"])
    for _ in range(rows):
        target = min(750, max(header + 8, int(rnd.lognormvariate(math.log(60), 0.8))))
        instruction = " ".join(rnd.choices(WORDS, k=rnd.randint(2, 8)))
        words = []
        def size():
            return len(tok(TEMPLATE.format(instruction=instruction, output=" ".join(words)))["input_ids"])

        while size() < target:
            words += rnd.choices(WORDS, k=max(1, (target - size()) // 3))
        texts.append(TEMPLATE.format(instruction=instruction, output=" ".join(words)))
    n_eval = max(8, rows // 10)
    for name, part in (("train", texts[n_eval:]), ("eval", texts[:n_eval])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part), encoding="utf-8")
    lengths = sorted(min(MAX_LENGTH, len(tok(t)["input_ids"]) + 1) for t in texts[n_eval:])
    return {"train_rows": len(lengths), "eval_rows": n_eval, "train_tokens": sum(lengths),
            "median_tokens": lengths[len(lengths) // 2], "max_tokens_before_truncation":
                max(len(tok(t)["input_ids"]) + 1 for t in texts)}


# ------------------------------------------------------------------------------------- the contenders


def _texts(workdir: Path, split: str) -> list[str]:
    return [json.loads(line)["text"] for line in (workdir / f"{split}.jsonl").read_text().splitlines()]


def _lora_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def _args(workdir: Path, name: str, max_steps: int | None):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(workdir / "out" / name), per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=BATCH, learning_rate=LR, num_train_epochs=1,
                             max_steps=max_steps or -1, save_strategy="no", report_to=[], seed=SEED,
                             logging_steps=10, use_cpu=True, include_num_input_tokens_seen="non_padding",
                             disable_tqdm=True)


def _result(trainer, train_out) -> dict:
    ev = trainer.evaluate()
    seconds = train_out.metrics["train_runtime"]
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"train_tokens": tokens, "train_seconds": round(seconds, 3),
            "train_tokens_per_second": round(tokens / seconds, 2), "eval_loss": ev["eval_loss"]}


def _encode(tok, texts):
    """The texts as rows: BOS (the tokenizer's own) + text + EOS, truncated at MAX_LENGTH."""
    return [(tok(t)["input_ids"] + [tok.eos_token_id])[:MAX_LENGTH] for t in texts]


def run_peft_script(workdir: Path, max_steps: int | None) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer

    tok = AutoTokenizer.from_pretrained(workdir / "model")

    def tokenize(batch):
        return tok([t + tok.eos_token for t in batch["text"]], padding="max_length", truncation=True,
                   max_length=MAX_LENGTH)

    train = Dataset.from_dict({"text": _texts(workdir, "train")}).map(tokenize, batched=True, remove_columns=["text"])
    evals = Dataset.from_dict({"text": _texts(workdir, "eval")}).map(tokenize, batched=True, remove_columns=["text"])
    trainer = Trainer(model=_lora_model(workdir / "model"), args=_args(workdir, "peft-script", max_steps),
                      train_dataset=train, eval_dataset=evals,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    return _result(trainer, trainer.train())


def run_trl(workdir: Path, max_steps: int | None, packing: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(workdir / "model")
    args = _args(workdir, "trl-packing" if packing else "trl", max_steps).to_dict()
    args = {k: v for k, v in args.items() if k in SFTConfig.__dataclass_fields__ and not k.startswith("_")}
    config = SFTConfig(**{**args, "max_length": MAX_LENGTH, "packing": packing, "dataset_text_field": "text"})
    trainer = SFTTrainer(model=_lora_model(workdir / "model"), args=config, processing_class=tok,
                         train_dataset=Dataset.from_dict({"text": _texts(workdir, "train")}),
                         eval_dataset=Dataset.from_dict({"text": _texts(workdir, "eval")}))
    return _result(trainer, trainer.train())


def run_ideal(workdir: Path, max_steps: int | None) -> dict:
    """The same tokens, cut into as many equal rows as the data has: the same steps, no padding at all."""
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer

    tok = AutoTokenizer.from_pretrained(workdir / "model")
    rows = _encode(tok, _texts(workdir, "train"))
    flat = [t for r in rows for t in r]
    width = len(flat) // len(rows)
    train = Dataset.from_dict({"input_ids": [flat[i * width:(i + 1) * width] for i in range(len(rows))]})
    evals = Dataset.from_dict({"input_ids": _encode(tok, _texts(workdir, "eval"))})
    trainer = Trainer(model=_lora_model(workdir / "model"), args=_args(workdir, "ideal", max_steps),
                      train_dataset=train, eval_dataset=evals,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    return _result(trainer, trainer.train())


def lorafit_command(workdir: Path, name: str, max_steps: int | None) -> list[str]:
    import yaml

    recipe = {"model": {"name": str(workdir / "model")},
              "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": TARGETS},
              "data": {"train": str(workdir / "train.jsonl"), "eval": str(workdir / "eval.jsonl"), "format": "text",
                       "max_length": MAX_LENGTH, "packing": name == "lorafit-packing"},
              "training": {"epochs": 1, "batch_size": BATCH, "grad_accum": 1, "learning_rate": LR, "seed": SEED,
                           "max_steps": max_steps},
              "evaluation": {"compare_base": False, "metrics": False},
              "output": {"dir": str(workdir / "out" / name), "overwrite": True}}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return [sys.executable, "-m", "lorafit", "train", str(path)]


def run_child(name: str, workdir: Path, max_steps: int | None, result_file: Path) -> None:
    """In the subprocess: train one contender, write its result."""
    if name == "peft-script":
        result = run_peft_script(workdir, max_steps)
    elif name in ("trl", "trl-packing"):
        result = run_trl(workdir, max_steps, packing=name == "trl-packing")
    elif name == "ideal":
        result = run_ideal(workdir, max_steps)
    else:
        raise SystemExit(f"unknown contender {name}")
    result_file.write_text(json.dumps(result), encoding="utf-8")


# ------------------------------------------------------------------------------------------- the parent


def _measure(cmd: list[str], env: dict) -> tuple[int, float, float, str]:
    """Run cmd; (exit code, wall seconds, peak RSS in MB of it and the children it waited for, stderr tail)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-2000:]
    return proc.returncode, wall, usage.ru_maxrss / 1024, tail


def run_contender(name: str, workdir: Path, max_steps: int | None) -> dict:
    import importlib.util

    if name.startswith("trl") and importlib.util.find_spec("trl") is None:
        return {"skipped": "trl is not installed (pip install trl, in the benchmark's environment only)"}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if name.startswith("lorafit"):
        cmd = lorafit_command(workdir, name, max_steps)
    else:
        result_file = workdir / f"{name}.result.json"
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child", name, "--workdir", str(workdir)]
        cmd += ["--max-steps", str(max_steps)] if max_steps else []
    code, wall, rss, tail = _measure(cmd, env)
    if code != 0:
        return {"failed": f"exit {code}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}
    if name.startswith("lorafit"):
        metrics = json.loads((workdir / "out" / name / "metrics.json").read_text())
        train = metrics["train"]
        result = {"train_tokens": train["tokens_seen"], "train_seconds": train["train_seconds"],
                  "train_tokens_per_second": train["train_tokens_per_second"],
                  "eval_loss": metrics["eval"].get("eval_loss")}
    else:
        result = json.loads(result_file.read_text())
    return {**result, "wall_seconds": round(wall, 2), "peak_rss_mb": round(rss, 1)}


def table(results: dict) -> list[str]:
    base = results.get("peft-script", {})
    ideal = results.get("ideal", {}).get("train_tokens_per_second")
    lines = [f"{'contender':<16} {'tokens/s':>10} {'×':>6} {'of ideal':>9} {'wall s':>8} {'×':>6} {'peak RSS MB':>12} "
             f"{'eval loss':>10}"]
    for name, r in results.items():
        if "train_tokens_per_second" not in r:
            lines.append(f"{name:<16} {r.get('skipped') or r.get('failed')}")
            continue
        tps_ratio = r["train_tokens_per_second"] / base["train_tokens_per_second"] if "wall_seconds" in base else 0
        wall_ratio = base["wall_seconds"] / r["wall_seconds"] if "wall_seconds" in base else 0
        r["ratio_tokens_per_second"], r["ratio_wall"] = round(tps_ratio, 3), round(wall_ratio, 3)
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else "-"
        of_ideal = f"{r['train_tokens_per_second'] / ideal:.0%}" if ideal else "-"
        lines.append(f"{name:<16} {r['train_tokens_per_second']:>10,.0f} {tps_ratio:>5.2f}× {of_ideal:>9} "
                     f"{r['wall_seconds']:>8.1f} "
                     f"{wall_ratio:>5.2f}× {r['peak_rss_mb']:>12,.0f} {loss:>10}")
    lines.append("× : against peft-script (tokens/s: higher is faster; wall: its wall time / this one's)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 rows: checks that every contender runs")
    parser.add_argument("--rows", type=int, default=None, help="rows of data (default 400; --quick 64)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each contender after this many steps")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders to run")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model, data and runs go (kept)")
    parser.add_argument("--output", type=Path, default=None, help="results JSON (default WORKDIR/throughput.json)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the model (default 256; a new workdir)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the model (default 4; a new workdir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.workdir, args.max_steps, args.workdir / f"{args.child}.result.json")
        return
    sys.path.insert(0, str(REPO))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lorafit-throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = args.rows or (64 if args.quick else 400)
    if not (workdir / "model" / "config.json").is_file():
        build_model(workdir / "model", args.hidden, args.layers)
    data = build_data(workdir, rows, workdir / "model")
    print(f"data: {data['train_rows']} train rows, {data['train_tokens']:,} tokens (median {data['median_tokens']}, "
          f"longest {data['max_tokens_before_truncation']} before truncation at {MAX_LENGTH}), "
          f"{data['eval_rows']} eval rows; batch {BATCH}; workdir {workdir}", flush=True)
    results = {}
    for name in [n for n in args.only.split(",") if n]:
        print(f"running {name} ...", flush=True)
        results[name] = run_contender(name, workdir, args.max_steps)
    lines = table(results)
    print("\n".join(lines))
    import platform

    model = json.loads((workdir / "model" / "config.json").read_text())
    doc = {"model": {k: model[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
           "data": data, "batch_size": BATCH, "max_length": MAX_LENGTH, "quick": args.quick,
           "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                       "python": platform.python_version()}, "results": results}
    out = args.output or workdir / "throughput.json"
    out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
