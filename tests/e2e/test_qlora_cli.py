"""QLoRA / 8-bit training end to end on the tiny model, then merge (bf16, gap measured) and push dry-run."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import run_cli, write_jsonl, write_recipe

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two runs share two cores


def _recipe(model, train, out, bits, **training):
    return {"model": {"name": str(model)},
            "quantization": {"bits": bits},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": str(train), "format": "completion", "eval_fraction": 0.25, "max_length": 32},
            "training": {"max_steps": 2, "batch_size": 4, "grad_accum": 1, "learning_rate": 5e-3,
                         "warmup_ratio": 0.0, "logging_steps": 1, "optim": "paged_adamw_8bit", **training},
            "output": {"dir": str(out)}}


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    train = write_jsonl(root / "train.jsonl", [{"prompt": f"Name a colour {i}:", "completion": f" {c}"}
                                               for i, c in enumerate(["blue", "red", "green", "yellow"] * 4)])
    jobs = {4: write_recipe(root / "q4.yaml", _recipe(tiny_llama, train, root / "run4", 4, eval_steps=1)),
            8: write_recipe(root / "q8.yaml", _recipe(tiny_llama, train, root / "run8", 8))}
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(jobs, pool.map(lambda r: run_cli("train", r, env=ENV), jobs.values())))
    return root, results


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_training_runs_on_cpu(runs, bits):
    root, results = runs
    res = results[bits]
    assert res.returncode == 0, res.stderr[-3000:]
    run = root / f"run{bits}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["gradient_checkpointing"] is True  # default on for quantized models
    assert metrics["train"]["steps"] == 2
    assert "paged_adamw_8bit needs CUDA; using adamw_torch" in res.stderr
    assert "will be cast from" not in res.stderr  # bitsandbytes' per-forward cast notice is silenced
    from safetensors import safe_open

    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if "lora_B" in k), "lora_B never trained"


def test_merge_of_qlora_adapter_reports_the_gap(runs, tmp_path):
    root, results = runs
    assert results[4].returncode == 0, results[4].stderr[-3000:]
    with ThreadPoolExecutor(2) as pool:
        merged = pool.submit(run_cli, "merge", root / "run4", "--output", tmp_path / "merged", "--verify", env=ENV)
        card = pool.submit(run_cli, "push", root / "run4", "--repo-id", "alice/tiny-qlora", "--dry-run",
                           env={**ENV, "HF_TOKEN": ""})
    res, card = merged.result(), card.result()
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gap to the 4-bit model it was trained on" in res.stdout
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["verify"]["passed"]
    assert report["verify"]["prompt_source"].startswith("train data")
    q = report["verify"]["quantized"]
    assert q["bits"] == 4 and q["quant_type"] == "nf4" and q["max_abs_logit_diff"] > 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config  # never merged into 4-bit

    assert card.returncode == 0, card.stderr[-2000:]
    assert "qlora" in card.stdout and "library_name: peft" in card.stdout and "eval.eval_loss" in card.stdout


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_qlora_on_gpu(tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Name a colour {i}:", "completion": " blue"}
                                                   for i in range(64)])
    rec = write_recipe(tmp_path / "gpu.yaml", _recipe(tiny_llama, train, tmp_path / "run", 4, max_steps=10,
                                                      precision="bf16", eval_steps=5))
    res = run_cli("train", rec)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "needs CUDA" not in res.stderr  # paged optimizer kept
    print("peak memory:", metrics.get("memory"), "tokens/s:", metrics["train"].get("train_tokens_per_second"))
    assert metrics["precision"] == "bf16" and metrics["gradient_checkpointing"] is True
    assert metrics["memory"]["gpu_peak_allocated_mb"] > 0
    assert metrics["train"]["final_loss"] < metrics["train"]["first_loss"]
    assert metrics["eval"]["eval_loss"] < metrics["eval"]["base_eval_loss"]  # the adapter learnt something
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
