"""find-targets and estimate through the real CLI, and estimate's count against a real training run."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli, write_jsonl, write_recipe

CONFIGS = Path(__file__).resolve().parent.parent / "data" / "configs"


def test_find_targets_json_on_a_config_only_directory():
    res = run_cli("find-targets", CONFIGS / "llama-3.1-8b", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)  # stdout holds the JSON document and nothing else
    assert doc["schema_version"] == 1
    assert doc["presets"]["attention"]["trainable_params"] == 13_631_488
    assert doc["presets"]["all-linear"]["trainable_params"] == 41_943_040


def test_find_targets_table_and_rank(tiny_gpt2):
    res = run_cli("find-targets", tiny_gpt2, "--r", "4", env={"COLUMNS": "160"})
    assert res.returncode == 0, res.stderr
    for expected in ("c_attn (fused)", "attn.c_proj", "mlp.c_fc", "modules_to_save candidates", "wte", "r=4"):
        assert expected in res.stdout


def test_find_targets_unknown_model_exits_2():
    res = run_cli("find-targets", "./no/such/model")
    assert res.returncode == 2
    assert res.stderr.startswith("error: MODEL: directory not found: ./no/such/model")
    assert "Traceback" not in res.stderr


def _recipe(tmp_path: Path, model: Path, **lora) -> Path:
    rows = [{"text": f"The quick brown fox number {i} jumps over the lazy dog."} for i in range(16)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    return write_recipe(tmp_path / "recipe.yaml", {
        "model": {"name": str(model)},
        "lora": {"r": 4, "alpha": 8, **lora},
        "data": {"train": str(tmp_path / "train.jsonl"), "format": "text", "max_length": 32, "eval_fraction": 0.25},
        "training": {"max_steps": 1, "batch_size": 2, "grad_accum": 1, "logging_steps": 1},
        "evaluation": {"compare_base": False},
        "output": {"dir": str(tmp_path / "run")},
    })


def test_estimate_equals_what_training_reports(tmp_path, tiny_llama):
    recipe = _recipe(tmp_path, tiny_llama, target_modules="all-linear", bias="all", modules_to_save=["lm_head"])
    est = run_cli("estimate", recipe, "--json")
    assert est.returncode == 0, est.stderr
    train = run_cli("train", recipe)
    assert train.returncode == 0, train.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    doc = json.loads(est.stdout)
    assert doc["trainable"]["trainable_params"] == metrics["trainable_params"]
    # The CPU plan describes the process that trained: the same order as its measured peak RSS.
    rss = metrics["memory"]["cpu_peak_rss_mb"] * 2**20
    assert 0.25 < doc["plans"]["cpu"]["total_bytes"] / rss < 4, (doc["plans"]["cpu"]["components"], rss)
