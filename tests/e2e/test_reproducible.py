"""Reproducibility: the same recipe trained twice on CPU gives the same adapter, tensor for tensor, and
metrics.json records what a rerun needs (command line without secrets, data hashes, seed, versions)."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

from lorafit.pipeline import command_line
from tests.conftest import REPO, run_cli, write_recipe

DATA = REPO / "examples" / "data" / "tiny-alpaca.jsonl"
FAKE_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


def test_command_line_is_scrubbed_of_token_like_values():
    argv = ["/venv/bin/lorafit", "train", "r.yaml", "--set", f"output.run_name={FAKE_TOKEN}", "--token", "s3cret",
            "--api-key=abc", "--set", "push.hf_token=xyz", "--set", "lora.r=8", "sk-" + "a" * 24]
    assert command_line(argv) == ["lorafit", "train", "r.yaml", "--set", "output.run_name=***", "--token", "***",
                                  "--api-key=***", "--set", "push.hf_token=***", "--set", "lora.r=8", "***"]


def test_same_recipe_twice_gives_the_same_adapter(tmp_path, tiny_llama):
    import torch
    from safetensors.torch import load_file

    # A recipe refuses tokens in its values; a file name is still argv: it must not reach metrics.json.
    recipe = write_recipe(tmp_path / f"{FAKE_TOKEN}.yaml", {
        "model": {"name": str(tiny_llama)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},  # dropout too: its masks must be seeded
        "data": {"train": str(DATA), "format": "alpaca", "eval_fraction": 0.125, "max_length": 128},
        "training": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "learning_rate": 3e-3, "logging_steps": 1,
                     "seed": 7},
    })
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def train(name):
        return run_cli("train", recipe, "--output-dir", tmp_path / name, env=env)

    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(train, ["a", "b"]))
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(a[k].count_nonzero() for k in a if ".lora_B." in k)  # it trained: not two zero adapters

    ma, mb = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b"))
    assert ma["train"]["loss_history"] == mb["train"]["loss_history"]
    assert ma["eval"]["eval_loss"] == mb["eval"]["eval_loss"]
    assert ma["data"]["fingerprint"] == mb["data"]["fingerprint"]

    # what a rerun needs, in metrics.json
    assert ma["seed"] == 7 and ma["data_seed"] == 42
    assert {"lorafit", "python", "torch", "transformers", "peft", "accelerate", "datasets"} <= set(ma["versions"])
    assert ma["data"]["files"] == [{"path": str(DATA), "sha256": hashlib.sha256(DATA.read_bytes()).hexdigest(),
                                    "rows": len(DATA.read_text().splitlines())}]
    command = ma["command"]
    assert command[1:] == ["train", str(tmp_path / "***.yaml"), "--output-dir", str(tmp_path / "a")]
    assert FAKE_TOKEN not in json.dumps(ma)
    assert {"token_lengths", "eos_cut", "duplicates", "empty_fields", "first_rows"} <= set(ma["data"])
    assert "data: 28 train / 4 eval rows; tokens per row p50" in procs[0].stderr
