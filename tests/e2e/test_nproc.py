"""Several processes: `lorafit train --nproc N` (lorafit starts torchrun itself) and an external
`torchrun -m lorafit train`, gloo on CPU. One adapter and one summary, warnings and user mistakes said once
(exit 2), Ctrl-C reaches the workers (checkpoint, 130), and two processes with the same global batch reach
the adapter one process reaches, with the tokens of both ranks counted. The launchers are real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_cli, run_cli_process

SMOKE = REPO / "recipes" / "tiny-smoke.yaml"
ENV = {"OMP_NUM_THREADS": "1"}
MISTAKE = "error: data.max_length: 4096 tokens is above the context"


def _torchrun(*args, port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "lorafit", "train", str(SMOKE), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **ENV})


def test_external_torchrun_writes_one_adapter_and_says_each_warning_once(tmp_path):
    run = tmp_path / "run"
    proc = _torchrun("--output-dir", run, "--set", "training.max_steps=3", "--set", "training.logging_steps=1",
                     "--set", "data.packing=true",
                     "--set", "training.optim=paged_adamw_32bit", port=29517)  # needs CUDA: a warning every rank meets
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter: ") == 1, proc.stdout  # rank 0 only
    assert proc.stderr.count("warning: training.optim: paged_adamw_32bit needs CUDA") == 1, proc.stderr[-3000:]
    assert "ChildFailedError" not in proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["distributed"] == "ddp" and metrics["packing"] is True
    assert metrics["train"]["steps"] == 3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(run.glob(".adapter.partial-*"))


def test_user_mistakes_are_exit_2_and_said_once_under_both_launchers(tmp_path):
    proc = run_cli_process("train", SMOKE, "--nproc", "2", "--output-dir", tmp_path / "r",
                           "--set", "data.max_length=4096", env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count(MISTAKE) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
    proc = _torchrun("--output-dir", tmp_path / "t", "--set", "data.max_length=4096", port=29518)  # > 512 positions
    assert proc.returncode != 0, proc.stderr[-3000:]  # torchrun's own exit code for a failed worker
    assert proc.stderr.count(MISTAKE) == 1, proc.stderr[-3000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [
        next(ln for ln in proc.stderr.splitlines() if ln.startswith(MISTAKE))], proc.stderr[-3000:]
    assert not (tmp_path / "t").exists()


def test_nproc_usage_mistakes(tmp_path):
    proc = run_cli("train", SMOKE, "--nproc", "2", "--nnodes", "2", "--output-dir", tmp_path / "r", env=ENV)
    assert proc.returncode == 2 and "error: --master-addr: several machines need" in proc.stderr, proc.stderr
    proc = run_cli("train", SMOKE, "--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h",
                   "--output-dir", tmp_path / "r", env=ENV)
    assert proc.returncode == 2 and "error: --node-rank: --node-rank 2 is not in 0..1" in proc.stderr, proc.stderr


def test_ctrl_c_reaches_the_workers(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lorafit", "train", str(SMOKE), "--nproc", "2", "--output-dir", str(run),
           "--set", "training.max_steps=100000", "--set", "training.logging_steps=1", "--set", "training.save_steps=null",
           "--set", "data.eval_fraction=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # wait until training runs
        lines.append(line)
        if line.startswith("step 2/") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    err = "".join(lines) + err
    assert proc.returncode == 130, err[-3000:]
    assert "resume with: lorafit train" in err and "--nproc 2" in err, err[-3000:]
    assert list((run / "checkpoints").glob("checkpoint-*")), err[-3000:]


def _adapter(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_two_processes_with_the_same_global_batch_reach_the_same_adapter(tmp_path):
    """DDP on gloo: 2 × batch 2 takes the same rows per step as 1 × batch 4 (accelerate shards each global batch),
    averages the gradients, so the adapters agree up to float noise."""
    common = ["--set", "training.max_steps=3", "--set", "training.group_by_length=false", "--set",
              "data.eval_fraction=0", "--set", "training.warmup_ratio=0", "--set", "training.learning_rate=1e-3"]
    one = run_cli("train", SMOKE, "--output-dir", tmp_path / "one", "--set", "training.batch_size=4", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli_process("train", SMOKE, "--nproc", "2", "--output-dir", tmp_path / "two",
                          "--set", "training.batch_size=2", *common, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("adapter: ") == 1, two.stdout
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")}
    assert metrics["two"]["world_size"] == 2 and metrics["one"]["world_size"] == 1
    # The tokens of both ranks are counted: the same rows per step, so the same tokens.
    assert metrics["two"]["train"]["tokens_seen"] == metrics["one"]["train"]["tokens_seen"]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    moved = max((t.abs().max().item() for k, t in a.items() if "lora_B" in k))
    assert moved > 1e-3  # the adapters did train
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-4 + 1e-3 * a[key].abs().max().item(), key


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_training_saves_the_whole_adapter(tmp_path, strategy):
    """FSDP / ZeRO-3 on the GPUs present: the adapter is gathered before saving, its tensors non-empty and equal
    to the LoRA weights of a plain (unsharded) reload of the last checkpoint's shapes."""
    import torch

    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    proc = run_cli_process("train", SMOKE, "--nproc", str(max(1, torch.cuda.device_count())), "--output-dir", run,
                   "--set", "training.max_steps=3", "--set", f"training.distributed.strategy={strategy}",
                   "--set", "training.precision=bf16", "--set", "data.eval_fraction=0", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors = _adapter(run)
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    expected = json.loads((run / "metrics.json").read_text())["trainable_params"]
    assert sum(t.numel() for t in tensors.values()) == expected
    assert max(t.abs().max().item() for k, t in tensors.items() if "lora_B" in k) > 0  # trained, not the init


@pytest.mark.gpu
@pytest.mark.skipif("__import__('torch').cuda.device_count() < 2", reason="needs two CUDA GPUs")
@pytest.mark.parametrize("bits", [None, 4])
def test_torchrun_two_gpus_each_rank_on_its_own_device(tmp_path, bits):
    """LoRA and QLoRA under DDP on two GPUs: each rank loads onto its own device (both on cuda:0, DDP
    refuses to start or GPU 0 runs out), one adapter, each warning once."""
    run = tmp_path / "run"
    quantized = ["--set", f"quantization.bits={bits}"] if bits else []
    proc = _torchrun("--output-dir", run, "--set", "training.max_steps=4", "--set", "training.precision=bf16",
                     *quantized, port=29519)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["memory"]["gpu_peak_allocated_mb"] > 0 and metrics["train"]["steps"] == 4
    assert proc.stderr.count("warning:") == len(set(ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")))
