"""The CUDA speed levers (issue 16): model.attn_implementation, training.compile, training.liger, and the
model FLOPs / MFU in metrics.json. Decisions and refusals are checked on CPU (the machine is passed in as
*device*, the packages faked present); what only a GPU can show is in the gpu-marked tests at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lorafit.core import flops, policies
from lorafit.errors import RecipeError
from lorafit.recipe import EvaluationSpec, ModelSpec, TrainingSpec, load_recipe, validate_recipe
from lorafit.tools.tiny import tiny_config
from tests.conftest import REPO, run_cli, write_recipe

MINIMAL = {"model": {"name": "owner/model"}, "data": {"train": "owner/dataset"}}
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _doc(tmp_path: Path, model: Path, *, model_extra: dict | None = None, **training) -> dict:
    return {"model": {"name": str(model), **(model_extra or {})},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"train": str(REPO / "examples" / "data" / "tiny-alpaca.jsonl"), "format": "alpaca",
                     "eval_fraction": 0, "max_length": 128},
            "training": {"max_steps": 3, "batch_size": 4, "grad_accum": 1, "logging_steps": 1, "save_steps": None,
                         "save_minutes": None, **training},
            "evaluation": {"compare_base": False, "metrics": False},
            "output": {"dir": str(tmp_path / "run")}}


def _fake_modules(monkeypatch, *present: str):
    """*present* installed, and (FlashAttention) importable on a GPU new enough for it."""
    real = policies.has_module
    monkeypatch.setattr(policies, "has_module", lambda name: name in present or real(name))
    monkeypatch.setattr(policies, "flash_attention_runs", lambda impl: policies.FLASH_ATTENTION[impl] in present)


# ---------------------------------------------------------------------------- recipe fields


def test_defaults_and_accepted_values():
    recipe = validate_recipe(MINIMAL)
    assert recipe.model.attn_implementation == "auto"
    assert recipe.training.compile is False and recipe.training.liger == "auto"
    for value, expected in (("auto", "auto"), (True, True), (False, False)):
        assert validate_recipe({**MINIMAL, "training": {"liger": value}}).training.liger == expected
    with pytest.raises(RecipeError, match="training.liger: got 'Auto'; did you mean 'auto'"):
        validate_recipe({**MINIMAL, "training": {"liger": "Auto"}})
    with pytest.raises(RecipeError, match="model.attn_implementation: got 'flash_attention2'; did you mean "
                                          "'flash_attention_2'"):
        validate_recipe({**MINIMAL, "model": {"name": "o/m", "attn_implementation": "flash_attention2"}})


def test_training_arguments_map_compile_and_liger(tmp_path):
    from lorafit.stages.train import training_arguments

    def args(liger=False, **spec):
        return training_arguments(TrainingSpec(**spec), EvaluationSpec(), output_dir=tmp_path, precision="fp32",
                                  gradient_checkpointing=False, has_eval=False, run_name="t", liger=liger)

    plain = args()
    assert plain.torch_compile is False and plain.use_liger_kernel is False
    on = args(compile=True, liger=True)
    assert on.torch_compile is True and on.torch_compile_backend == "inductor" and on.use_liger_kernel is True


# ---------------------------------------------------------------------------- attention


def test_auto_attention_picks_flash_attention_2_only_where_it_can_run(monkeypatch):
    llama, t5 = tiny_config("llama", 384), tiny_config("t5", 384)
    auto = ModelSpec(name="x")
    assert policies.attention(auto, "bfloat16", llama, device="cpu") is None  # this machine: no CUDA
    assert policies.attention(auto, "bfloat16", llama, device="cuda") is None  # no flash_attn here
    _fake_modules(monkeypatch, "flash_attn")
    assert policies.attention(auto, "bfloat16", llama, device="cuda") == "flash_attention_2"
    assert policies.attention(auto, "float16", llama, device="cuda") == "flash_attention_2"
    assert policies.attention(auto, "float32", llama, device="cuda") is None  # FlashAttention is half precision
    assert policies.attention(auto, "bfloat16", llama, device="cpu") is None
    assert policies.attention(ModelSpec(name="x", task="seq2seq_lm"), "bfloat16", t5, device="cuda") is None
    assert policies.attention(auto, "bfloat16", None, device="cuda") is None  # class unknown: the default
    for impl in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"):
        assert policies.attention(ModelSpec(name="x", attn_implementation=impl), "float32", llama) == impl


def test_explicit_flash_attention_is_refused_where_it_cannot_run(monkeypatch):
    llama = tiny_config("llama", 384)
    fa2, fa3 = (ModelSpec(name="x", attn_implementation=f"flash_attention_{v}") for v in (2, 3))
    with pytest.raises(RecipeError, match=r"^model.attn_implementation: flash_attention_2 needs a CUDA GPU, and this "
                                          r"machine has none; set model.attn_implementation: sdpa"):
        policies.check_attention(fa2, "bfloat16", llama, device="cpu")
    with pytest.raises(RecipeError, match=r"flash_attention_2 needs the flash_attn module, which is not installed; "
                                          r".* -m pip install flash-attn --no-build-isolation, or set "
                                          r"model.attn_implementation: sdpa"):
        policies.check_attention(fa2, "bfloat16", llama, device="cuda")
    with pytest.raises(RecipeError, match="flash_attention_3 needs the flash_attn_interface module.*FlashAttention-3"):
        policies.check_attention(fa3, "bfloat16", llama, device="cuda")
    _fake_modules(monkeypatch, "flash_attn")
    policies.check_attention(fa2, "bfloat16", llama, device="cuda")  # can run: no error
    with pytest.raises(RecipeError, match="runs in bf16/fp16 only, and the weights load in float32; set "
                                          "training.precision: bf16"):
        policies.check_attention(fa2, "float32", llama, device="cuda")
    with pytest.raises(RecipeError, match="no FlashAttention path for model type 't5'"):
        policies.check_attention(ModelSpec(name="x", task="seq2seq_lm", attn_implementation="flash_attention_2"),
                                 "bfloat16", tiny_config("t5", 384), device="cuda")
    for impl in ("auto", "sdpa", "eager"):  # nothing to refuse
        policies.check_attention(ModelSpec(name="x", attn_implementation=impl), "float32", llama, device="cpu")


def test_flash_attention_on_a_gpu_too_old_or_a_build_that_does_not_import(monkeypatch):
    """Installed (find_spec finds it) but not runnable: a T4/V100 (compute capability < 8), or a flash_attn
    built for another torch. auto falls back to the default; an explicit choice is refused before loading."""
    llama = tiny_config("llama", 384)
    monkeypatch.setattr(policies, "has_module", lambda name: True)
    monkeypatch.setattr(policies, "flash_attention_runs", lambda impl: False)
    assert policies.attention(ModelSpec(name="x"), "float16", llama, device="cuda") is None
    with pytest.raises(RecipeError, match=r"^model.attn_implementation: flash_attention_2 does not run here: it needs "
                                          r"a GPU of compute capability 8.0 or newer .*; set "
                                          r"model.attn_implementation: sdpa"):
        policies.check_attention(ModelSpec(name="x", attn_implementation="flash_attention_2"), "float16", llama,
                                 device="cuda")


def test_flash_attention_runs_is_false_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert policies.flash_attention_runs("flash_attention_2") is False


def test_validate_and_train_refuse_before_loading_weights(tmp_path, tiny_llama):
    """The real CLI: exit 2, one line naming the recipe path and the fix; train writes no run dir."""
    recipe = write_recipe(tmp_path / "r.yaml", _doc(tmp_path, tiny_llama))
    cases = [("validate", "model.attn_implementation=flash_attention_2",
              "model.attn_implementation: flash_attention_2 needs a CUDA GPU"),
             ("validate", "training.liger=true", "training.liger: Liger kernels (Triton) need a CUDA GPU"),
             ("train", "model.attn_implementation=flash_attention_3",
              "model.attn_implementation: flash_attention_3 needs a CUDA GPU")]
    for command, setting, message in cases:
        proc = run_cli(command, recipe, "--set", setting, env=ENV)
        assert proc.returncode == 2, (setting, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "; set " in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- Liger


def test_liger_decision(monkeypatch):
    auto, on, off = TrainingSpec(), TrainingSpec(liger=True), TrainingSpec(liger=False)
    assert policies.liger(auto, "causal_lm", "llama", device="cpu") is False
    assert policies.liger(auto, "causal_lm", "llama", device="cuda") is False  # liger_kernel not installed here
    assert policies.liger(off, "causal_lm", "llama", device="cuda") is False
    assert policies.liger(on, "causal_lm", "llama", device="cuda") is True  # check_liger refuses what cannot run
    monkeypatch.setattr(policies, "liger_supports", lambda model_type: model_type == "llama")
    assert policies.liger(auto, "causal_lm", "llama", device="cuda") is True
    assert policies.liger(auto, "causal_lm", "gpt2", device="cuda") is False  # no kernels for the model type
    assert policies.liger(auto, "seq_cls", "llama", device="cuda") is False   # auto: causal_lm only
    assert policies.liger(auto, "causal_lm", "llama", device="cpu") is False


def test_liger_true_is_refused_where_it_cannot_run(monkeypatch):
    on = TrainingSpec(liger=True)
    with pytest.raises(RecipeError, match=r"^training.liger: Liger kernels \(Triton\) need a CUDA GPU.*; set "
                                          r"training.liger: auto .* or false"):
        policies.check_liger(on, "llama", device="cpu")
    with pytest.raises(RecipeError, match=r"training.liger: the liger_kernel package is not installed; install it "
                                          r"\(.* -m pip install liger-kernel\)"):
        policies.check_liger(on, "llama", device="cuda")
    monkeypatch.setattr(policies, "has_module", lambda name: True)
    monkeypatch.setattr(policies, "liger_supports", lambda model_type: model_type == "llama")
    policies.check_liger(on, "llama", device="cuda")
    with pytest.raises(RecipeError, match="liger_kernel has no kernels for model type 'gpt2'"):
        policies.check_liger(on, "gpt2", device="cuda")
    for value in ("auto", False):
        policies.check_liger(TrainingSpec(liger=value), "gpt2", device="cpu")


# ---------------------------------------------------------------------------- FLOPs and MFU


def _tiny_llama_lora(r: int = 8):
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        base = tf.AutoModelForCausalLM.from_config(tiny_config("llama", 384))
    return get_peft_model(base, LoraConfig(r=r, target_modules="all-linear"))


def test_flops_of_the_tiny_llama_by_hand():
    # hidden 64, 2 layers, 4 heads × 16, 2 kv heads (k, v: 64 → 32), intermediate 128, vocab 384, untied lm_head
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128          # q k v o + gate up down
    frozen = 2 * per_layer + 64 * 384                                          # + lm_head (the embedding: no matmul)
    lora = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 128))  # r·(in + out) each
    assert (frozen, lora) == (98_304, 16_384)
    model = _tiny_llama_lora(r=8)
    assert flops.matmul_params(model) == (frozen, lora)
    assert flops.attention_dims(model.get_base_model().config) == (2, 64)
    # 2 FLOPs forward per weight; backward 2 more (input gradient) for all, 2 more (weight gradient) for LoRA;
    # attention 12·L·d·T (PaLM B) at T = 100.
    assert flops.flops_per_token(frozen, lora, 2, 64, 100) == 4 * 98_304 + 6 * 16_384 + 12 * 2 * 64 * 100


def test_attention_length_is_the_token_weighted_mean_row_length():
    import datasets

    rows = datasets.Dataset.from_dict({"input_ids": [[5] * 2, [5] * 4, [5] * 10]})
    assert flops.attention_length(rows) == pytest.approx((4 + 16 + 100) / 16)
    # a held-out split is an index over the whole table: only its own rows count
    split = datasets.Dataset.from_dict({"input_ids": [[5] * n for n in range(1, 11)]}).select([1, 9])
    assert flops.attention_length(split) == pytest.approx((4 + 100) / 12)
    # packed blocks: the rows found from the position ids, not the blocks' lengths
    packed = datasets.Dataset.from_dict({"input_ids": [[5] * 6, [5] * 10],
                                         "position_ids": [[0, 1, 0, 1, 2, 3], list(range(10))]})
    assert flops.attention_length(packed) == pytest.approx((4 + 16 + 100) / 16)
    assert flops.attention_length(datasets.Dataset.from_dict({"input_ids": [[]]})) == 0.0


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H100 NVL", "bf16", 835.0),
    ("NVIDIA H200", "bf16", 989.0), ("NVIDIA H200 NVL", "fp16", 835.0), ("NVIDIA GH200 480GB", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100 80GB PCIe", "fp16", 312.0), ("NVIDIA A10G", "bf16", 125.0),
    ("NVIDIA A10", "bf16", 125.0), ("NVIDIA L40S", "bf16", 362.0), ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2), ("Tesla T4", "fp16", 65.0), ("Tesla T4", "bf16", None),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0), ("Tesla V100-PCIE-32GB", "fp16", 112.0),
    ("NVIDIA H100 80GB HBM3", "fp32", None), ("Some Future GPU", "bf16", None), (None, "bf16", None),
])
def test_peak_table(name, precision, peak):
    assert flops.peak_tflops(name, precision) == peak


def test_train_throughput_mfu_only_where_the_peak_is_known():
    import datasets

    model = _tiny_llama_lora(r=8)
    rows = datasets.Dataset.from_dict({"input_ids": [[5] * 10] * 3})  # T = 10
    per_token = 4 * 98_304 + 6 * 16_384 + 12 * 2 * 64 * 10
    cpu = flops.train_throughput(model, rows, task="causal_lm", tokens_per_second=1e6, precision="fp32", device="")
    assert cpu == {"model_flops_per_token": per_token, "model_tflops_per_second": pytest.approx(per_token / 1e6, rel=1e-3),
                   "mfu": None}
    gpu = flops.train_throughput(model, rows, task="causal_lm", tokens_per_second=1e6, precision="bf16",
                                 world_size=2, device="NVIDIA H100 80GB HBM3")
    assert gpu["mfu"] == pytest.approx(per_token / 1e6 / (2 * 989), rel=1e-3)
    assert flops.train_throughput(model, rows, task="seq2seq_lm", tokens_per_second=1e6, precision="bf16",
                                  device="NVIDIA H100 80GB HBM3") == \
        {"model_flops_per_token": None, "model_tflops_per_second": None, "mfu": None}


def test_a_cpu_run_records_the_levers_and_its_model_tflops(tmp_path, tiny_llama):
    from lorafit import pipeline

    result = pipeline.train(load_recipe(write_recipe(tmp_path / "r.yaml", _doc(tmp_path, tiny_llama)), []))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["attn_implementation"] == "sdpa" and metrics["compile"] is False and metrics["liger"] is False
    train = metrics["train"]
    assert train["model_tflops_per_second"] > 0 and train["mfu"] is None
    expected = train["model_flops_per_token"] * train["train_tokens_per_second"] / 1e12
    assert train["model_tflops_per_second"] == pytest.approx(expected, rel=1e-3)
    # 4·98,304 + 6·16,384 + 12·2·64·T with T between the shortest and the longest row (≤ max_length 128)
    assert 491_520 + 1536 * 8 < train["model_flops_per_token"] <= 491_520 + 1536 * 128


# ---------------------------------------------------------------------------- packing with FlashAttention


def test_prepare_model_flattens_packed_batches_for_flash_attention(tmp_path):
    """FlashAttention finds packed rows only in a batch of one sequence: the collator then lays every block of
    the batch end to end, without padding. The layout itself is checked here with sdpa (CPU): the loss of the
    flattened batch equals the rows' losses one by one."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorafit.stages import packing
    from tests.unit.test_packing import IGNORE, _bundle, _model, _token_loss_sum

    plain, packed = _bundle(tmp_path, packing_on=False), _bundle(tmp_path)
    model = get_peft_model(_model("llama", "sdpa"), LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0,
                                                               init_lora_weights=False))
    packing.prepare_model(model, packed.collator)
    assert packed.collator.flatten is False  # sdpa: [batch, longest block] as before
    model.get_base_model().config._attn_implementation = "flash_attention_2"
    packing.prepare_model(model, packed.collator)
    assert packed.collator.flatten is True
    features = [packed.train[i] for i in range(len(packed.train))]
    batch = packed.collator(features)
    total = sum(len(f["input_ids"]) for f in features)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (1, total) for k in ("input_ids", "labels",
                                                                                      "position_ids")}
    assert (batch["labels"][batch["position_ids"] == 0] == IGNORE).all()  # no row learns across a seam
    assert packing.real_tokens(batch["position_ids"]) == total

    model.get_base_model().config._attn_implementation = "sdpa"
    model.train()
    with torch.no_grad():
        flat_sum = _token_loss_sum(model(**batch).logits, batch["labels"])
        rows_sum = sum(_token_loss_sum(model(input_ids=torch.tensor([r["input_ids"]])).logits,
                                       torch.tensor([r["labels"]])) for r in plain.train)
    assert abs(flat_sum.item() - rows_sum.item()) <= 1e-5 * max(1.0, abs(rows_sum.item()))


# ---------------------------------------------------------------------------- on a GPU


def _cuda_run(tmp_path, model, **training):
    from lorafit import pipeline

    result = pipeline.train(load_recipe(write_recipe(tmp_path / "r.yaml", _doc(tmp_path, model, **training)), []))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert all(math.isfinite(h["loss"]) for h in metrics["train"]["loss_history"])
    assert metrics["train"]["steps"] == 3
    adapter = result.run_dir / "adapter" / "adapter_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(adapter), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k and "_orig_mod" not in k for k in keys), keys[:4]
    return metrics


@pytest.mark.gpu
@pytest.mark.parametrize("impl, module", [("flash_attention_2", "flash_attn"),
                                          ("flash_attention_3", "flash_attn_interface")])
def test_packed_loss_equals_rows_one_by_one_with_flash_attention(tmp_path, impl, module):
    """tests/unit/test_packing.py's proof, on CUDA with FlashAttention (bf16, so to bf16 precision)."""
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from lorafit.stages import packing
    from tests.unit.test_packing import _bundle, _token_loss_sum

    if not policies.has_module(module):
        pytest.skip(f"{module} is not installed")
    plain, packed = _bundle(tmp_path, packing_on=False), _bundle(tmp_path)
    torch.manual_seed(0)
    # head dim 64: one every FlashAttention build has kernels for (the CPU tests' 16 is not in FA3's list)
    config = tiny_config("llama", 384, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    base = tf.AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.bfloat16).cuda()
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))
    packing.prepare_model(model, packed.collator)
    assert packed.collator.flatten
    model.train()
    with torch.no_grad():
        batch = {k: v.cuda() for k, v in packed.collator([packed.train[i] for i in range(len(packed.train))]).items()}
        packed_sum = _token_loss_sum(model(**batch).logits, batch["labels"])
        rows_sum = sum(_token_loss_sum(model(input_ids=torch.tensor([r["input_ids"]], device="cuda")).logits,
                                       torch.tensor([r["labels"]], device="cuda")) for r in plain.train)
    assert abs(packed_sum.item() - rows_sum.item()) <= 1e-2 * abs(rows_sum.item()), (packed_sum, rows_sum)


@pytest.mark.gpu
def test_auto_attention_on_cuda_and_mfu(tmp_path, tiny_llama):
    metrics = _cuda_run(tmp_path, tiny_llama)
    expected = "flash_attention_2" if policies.has_module("flash_attn") else "sdpa"
    assert metrics["attn_implementation"] == expected and metrics["precision"] == "bf16"
    train = metrics["train"]
    assert train["model_tflops_per_second"] > 0
    if flops.peak_tflops(flops.device_name(), "bf16"):
        assert 0 < train["mfu"] < 1


@pytest.mark.gpu
def test_compile_trains_on_cuda(tmp_path, tiny_llama):
    assert _cuda_run(tmp_path, tiny_llama, compile=True)["compile"] is True


@pytest.mark.gpu
def test_liger_trains_on_cuda(tmp_path, tiny_llama):
    if not policies.has_module("liger_kernel"):
        pytest.skip("liger_kernel is not installed")
    assert _cuda_run(tmp_path, tiny_llama, liger=True)["liger"] is True


def test_a_config_without_the_usual_names_gives_no_figure_and_no_crash():
    import types

    import datasets

    model = _tiny_llama_lora(r=8)
    model.get_base_model().config = types.SimpleNamespace(model_type="custom", hidden_size=64)
    rows = datasets.Dataset.from_dict({"input_ids": [[5] * 10]})
    assert flops.train_throughput(model, rows, task="causal_lm", tokens_per_second=1.0, precision="bf16") == \
        {"model_flops_per_token": None, "model_tflops_per_second": None, "mfu": None}
