"""FSDP and ZeRO-3 load the base as accelerate intends for sharded training (issue 25): never the whole base onto
every GPU through a per-rank device_map. Under FSDP the local rank 0 reads the weights on the CPU and the others
build the model on the meta device (cpu_ram_efficient_loading; FSDP broadcasts rank 0's weights as it shards);
under ZeRO-3 deepspeed.zero.Init partitions the weights as they load. The loading arguments are chosen here, on
CPU; the real sharded run is gpu-marked."""

from __future__ import annotations

import json
import os

import pytest

from lorafit.core import distributed
from lorafit.recipe import DistributedSpec


@pytest.fixture
def clean_env():
    """No accelerate environment before, and none left after: what these tests set (as `accelerate launch` would)
    must not make later tests in this process shard."""
    keys = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING", "ACCELERATE_USE_DEEPSPEED")
    saved = os.environ.copy()
    for key in keys:
        os.environ.pop(key, None)
    yield
    os.environ.clear()
    os.environ.update(saved)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # nothing of an FSDP plugin for the next Trainer


def test_plain_and_ddp_runs_put_the_whole_base_on_their_own_gpu(clean_env):
    for spec in (DistributedSpec(), DistributedSpec(strategy="deepspeed", zero_stage=2)):
        assert distributed.sharding(spec) is None
        assert distributed.loading_kwargs(None, device="cuda", rank=1) == {"device_map": {"": 1}}
    assert distributed.loading_kwargs(None, device="cpu", rank=0) == {}


def test_fsdp_loads_on_local_rank_0_only(clean_env):
    spec = DistributedSpec(strategy="fsdp")
    assert distributed.sharding(spec) == "fsdp"
    assert distributed.trainer_kwargs(spec)["fsdp_config"]["cpu_ram_efficient_loading"] is True
    kwargs = distributed.loading_kwargs("fsdp", device="cuda", rank=1)
    assert "device_map" not in kwargs, "a device_map would put the whole base on every GPU"
    # What accelerate launch would have set, read by transformers' from_pretrained (is_fsdp_enabled):
    assert os.environ["ACCELERATE_USE_FSDP"] == "true" and os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


def test_zero3_loads_partitioned(clean_env, tmp_path):
    assert distributed.sharding(DistributedSpec(strategy="deepspeed")) == "zero3"  # zero_stage defaults to 3
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert distributed.sharding(DistributedSpec(strategy="deepspeed", config=str(config))) == "zero3"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert distributed.sharding(DistributedSpec(strategy="deepspeed", config=str(config))) is None
    assert distributed.loading_kwargs("zero3", device="cuda", rank=1) == {}


def test_fsdp_training_arguments_ask_transformers_for_low_memory_loading(clean_env, tmp_path):
    """The run's TrainingArguments are built before the model loads (stages.train.run_arguments): with FSDP they
    set what from_pretrained reads."""
    from lorafit.core import policies
    from lorafit.recipe import validate_recipe
    from lorafit.stages.train import run_arguments

    recipe = validate_recipe({"model": {"name": "x"}, "data": {"train": "t.jsonl"},
                              "training": {"distributed": {"strategy": "fsdp"}}, "output": {"dir": str(tmp_path)}})
    args = run_arguments(recipe, run_dir=tmp_path, precision="fp32", has_eval=False, model_type="llama")
    assert args.fsdp_config["cpu_ram_efficient_loading"] is True
    assert os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert policies.this_device() == "cpu"


@pytest.mark.gpu
def test_fsdp_on_one_gpu_trains(tmp_path):
    """The real thing, on the device machine: `--nproc 1` with FSDP on the tiny llama."""
    from tests.conftest import REPO, run_cli_process, write_jsonl, write_recipe

    rows = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": f"Q{i}", "input": "", "output": f"A{i}"}
                                                 for i in range(16)])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"name": str(REPO / "examples" / "tiny-llama")},
        "data": {"train": str(rows), "format": "alpaca", "max_length": 256, "eval_fraction": 0.0},
        "training": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "distributed": {"strategy": "fsdp"}},
        "evaluation": {"metrics": False}, "output": {"dir": str(tmp_path / "run")}})
    proc = run_cli_process("train", recipe, "--nproc", "1")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
