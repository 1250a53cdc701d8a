"""training.distributed on this machine: what CPU refuses and why, the TrainingArguments each strategy
becomes, QLoRA + FSDP's quant storage, and the launcher's command line."""

from __future__ import annotations

import importlib.util

import pytest

from lorafit.core import distributed
from lorafit.errors import LorafitError
from lorafit.recipe import DistributedSpec, QuantizationSpec
from tests.conftest import REPO, run_cli

SMOKE = REPO / "recipes" / "tiny-smoke.yaml"


def test_qlora_fsdp_stores_4bit_weights_in_the_compute_dtype():
    import torch

    from lorafit.core.quantization import bnb_config

    spec = QuantizationSpec(bits=4, compute_dtype="bfloat16")
    assert bnb_config(spec, fsdp=True).bnb_4bit_quant_storage == torch.bfloat16
    assert bnb_config(spec).bnb_4bit_quant_storage == torch.uint8


def test_trainer_kwargs_per_strategy(tmp_path):
    assert distributed.trainer_kwargs(DistributedSpec()) == {}
    fsdp = distributed.trainer_kwargs(DistributedSpec(strategy="fsdp"))
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    ds = distributed.trainer_kwargs(DistributedSpec(strategy="deepspeed", zero_stage=2))
    assert ds["deepspeed"]["zero_optimization"]["stage"] == 2
    cfg = tmp_path / "ds.json"
    cfg.write_text("{}")
    assert distributed.trainer_kwargs(DistributedSpec(strategy="deepspeed", config=str(cfg))) == {"deepspeed": str(cfg)}


@pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="the CPU refusal")
def test_fsdp_on_cpu_is_refused_before_anything_loads(tmp_path):
    proc = run_cli("validate", SMOKE, "--set", "training.distributed.strategy=fsdp")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: training.distributed.strategy: fsdp shards the model over CUDA GPUs")
    assert "use strategy ddp on CPU" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_missing_names_the_pip_command():
    with pytest.raises(LorafitError, match=r"deepspeed is not installed; install it \(.*pip install deepspeed\)"):
        distributed.check(DistributedSpec(strategy="deepspeed"))


def test_a_config_file_must_exist_and_needs_a_sharding_strategy(tmp_path):
    with pytest.raises(LorafitError, match="training.distributed.config: a config file is read only by fsdp"):
        distributed.check(DistributedSpec(config=str(tmp_path / "x.json")))
    with pytest.raises(LorafitError, match="training.distributed.config: config file not found"):
        distributed.check(DistributedSpec(strategy="fsdp", config=str(tmp_path / "x.json")))


def test_launch_args_are_torchruns():
    args = distributed.launch_args(["r.yaml", "--set", "a=1"], nproc=4, nnodes=2, node_rank=1, master_addr="h",
                                   master_port=29400)
    assert args == ["--nproc_per_node", "4", "--nnodes", "2", "--node_rank", "1", "--master_addr", "h",
                    "--master_port", "29400", "-m", "lorafit", "train", "r.yaml", "--set", "a=1"]
    from torch.distributed.run import parse_args

    parsed = parse_args(args)
    assert parsed.nproc_per_node == "4" and parsed.training_script == "lorafit" and parsed.module
