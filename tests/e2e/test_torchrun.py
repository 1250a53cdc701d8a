"""Two processes under torchrun (gloo on CPU): one adapter, one summary, each warning once, tokens counted
over both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli


def test_torchrun_two_processes_write_one_adapter(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "lorafit", "train", str(REPO / "recipes" / "tiny-smoke.yaml"), "--output-dir", str(run),
           "--set", "training.max_steps=4", "--set", "training.logging_steps=1",
           "--set", "training.optim=paged_adamw_32bit"]  # needs CUDA: a warning every rank meets
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter: ") == 1, proc.stdout  # rank 0 only
    assert proc.stderr.count("warning: training.optim: paged_adamw_32bit needs CUDA") == 1, proc.stderr[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(run.glob(".adapter.partial-*"))
    ddp = json.loads((run / "metrics.json").read_text())["train"]
    assert ddp["steps"] == 4

    # The same steps in one process: each step then sees half the rows, so about half the tokens.
    single = run_cli("train", REPO / "recipes" / "tiny-smoke.yaml", "--output-dir", tmp_path / "one",
                     "--set", "training.max_steps=4", "--set", "training.logging_steps=1")
    assert single.returncode == 0, single.stderr
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())["train"]
    assert ddp["tokens_seen"] > 1.3 * one["tokens_seen"], (ddp["tokens_seen"], one["tokens_seen"])


def test_torchrun_user_errors_are_said_once(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           "-m", "lorafit", "train", str(REPO / "recipes" / "tiny-smoke.yaml"), "--output-dir", str(tmp_path / "r"),
           "--set", "data.max_length=4096"]  # above the tiny model's 512 positions
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert proc.stderr.count("error: data.max_length: 4096 tokens is above the context") == 1, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif("__import__('torch').cuda.device_count() < 2", reason="needs two CUDA GPUs")
@pytest.mark.parametrize("bits", [None, 4])
def test_torchrun_two_gpus_each_rank_on_its_own_device(tmp_path, bits):
    """LoRA and QLoRA under DDP on two GPUs: each rank loads onto its own device (both on cuda:0, DDP
    refuses to start or GPU 0 runs out), one adapter, each warning once."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           "-m", "lorafit", "train", str(REPO / "recipes" / "tiny-smoke.yaml"), "--output-dir", str(run),
           "--set", "training.max_steps=4", "--set", "training.precision=bf16"]
    if bits:
        cmd += ["--set", f"quantization.bits={bits}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["memory"]["gpu_peak_allocated_mb"] > 0 and metrics["train"]["steps"] == 4
    assert proc.stderr.count("warning:") == len(set(ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")))
