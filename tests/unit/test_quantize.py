"""The quantize stage on this CPU: 4/8-bit loading, k-bit preparation, the Linear4bit repack work-around."""

from __future__ import annotations

import logging
import warnings

import pytest

from lorafit.recipe import QuantizationSpec
from lorafit.core import libs, policies, quantization
from lorafit.stages import quantize


def _load(base, spec, *, gradient_checkpointing=True, safe=True):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization.bnb_config(spec), dtype=torch.float32)
    if safe:
        model = quantize.prepare_quantized(model, spec, gradient_checkpointing=gradient_checkpointing)
    else:  # what training did before the work-around: peft's preparation alone
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _grads(model, ids, *, eval_first: bool):
    import torch

    if eval_first:  # what the Trainer's mid-training evaluation does
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bnb_config():
    import torch

    assert quantization.bnb_config(QuantizationSpec()) is None
    cfg = quantization.bnb_config(QuantizationSpec(bits=4, quant_type="fp4", double_quant=False, compute_dtype="float16"))
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "fp4" and not cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.float16
    assert quantization.bnb_config(QuantizationSpec(bits=8)).load_in_8bit


def test_4bit_prepare_sets_up_training(tiny_llama):
    import bitsandbytes as bnb
    import torch

    model = _load(tiny_llama, QuantizationSpec(bits=4))
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 14 and all(m.support_avx512bf16_for_cpu is False for m in linears)
    assert linears[0].weight.quant_state.quant_type == "nf4" and linears[0].weight.quant_state.nested
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    norm = model.base_model.model.model.norm.weight
    assert norm.dtype == torch.float32 and not norm.requires_grad
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    _, grads = _grads(model, ids, eval_first=False)
    assert grads and all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


def test_eval_mid_training_keeps_gradients_exact(tiny_llama):
    """After an eval-mode no-grad forward the gradients must equal those of a run without the eval."""
    import torch

    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _load(tiny_llama, QuantizationSpec(bits=4))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _grads(model, ids, eval_first=False)
    opt.step()  # mid-training: one step done
    loss_a, plain = _grads(model, ids, eval_first=False)
    loss_b, after_eval = _grads(model, ids, eval_first=True)
    assert loss_a == loss_b
    assert all(torch.equal(plain[n], after_eval[n]) for n in plain)


def test_without_the_work_around_gradients_go_wrong(tiny_llama):
    """The bug the work-around prevents. AVX512-BF16 CPUs repack by themselves; elsewhere force it."""
    import bitsandbytes as bnb
    import torch

    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _load(tiny_llama, QuantizationSpec(bits=4), safe=False)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # what bitsandbytes sets on an AVX512-BF16 CPU
    _, plain = _grads(model, ids, eval_first=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "silently incorrect" notice
        _, after_eval = _grads(model, ids, eval_first=True)
    broken = max((plain[n] - after_eval[n]).abs().max().item() for n in plain)
    assert broken > 1e-2
    # cpu_safe also undoes a repack that already happened: bitsandbytes' inverse re-quantizes the
    # double-quant constants, so the weights come back close to, not bit-equal with, the originals
    quantization.cpu_safe(model)
    _, repaired = _grads(model, ids, eval_first=True)
    _, again = _grads(model, ids, eval_first=True)
    assert all(torch.equal(repaired[n], again[n]) for n in plain)
    assert max((plain[n] - repaired[n]).abs().max().item() for n in plain) < broken / 10


def test_8bit_trains(tiny_llama, caplog):
    import bitsandbytes as bnb
    import torch

    with caplog.at_level(logging.WARNING):
        model = _load(tiny_llama, QuantizationSpec(bits=8), gradient_checkpointing=False)
        assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
        ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
        loss, grads = _grads(model, ids, eval_first=True)
    assert loss == loss and all(torch.isfinite(g).all() for g in grads.values())
    assert not [r for r in caplog.records if "will be cast" in r.getMessage()], "cast notice not silenced"


def test_silence_keeps_real_warnings():
    libs.prepare()
    libs.prepare()  # idempotent
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization")
        logger.warning("something real went wrong")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something real went wrong"]


def test_paged_optimizer_falls_back_on_cpu(capsys):
    import torch

    if torch.cuda.is_available():
        assert policies.optimizer("paged_adamw_8bit") == "paged_adamw_8bit"
        return
    assert policies.optimizer("paged_adamw_8bit") == "adamw_torch"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "paged_adamw_8bit" in err and "adamw_torch" in err
    assert policies.optimizer("adamw_torch") == "adamw_torch" and capsys.readouterr().err == ""


@pytest.mark.gpu
@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_4bit_on_gpu(tiny_llama):
    import torch

    model = _load(tiny_llama, QuantizationSpec(bits=4)).cuda()
    ids = torch.randint(3, 300, (2, 24), device="cuda")
    loss, grads = _grads(model, ids, eval_first=True)
    assert loss == loss and all(torch.isfinite(g).all() for g in grads.values())
