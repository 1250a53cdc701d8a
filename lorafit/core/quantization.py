"""bitsandbytes for every model load: its config from the recipe, its CPU trap disarmed (its noise: core.libs).

Used wherever a base is loaded quantized (training, evaluation, generation, merge --verify's gap to the
quantized model). On CPU, Linear4bit repacks its weights for a fast AVX512-BF16 inference kernel the
first time it runs in eval mode without grad; training after that (an eval between steps) gets silently
wrong gradients. ``cpu_safe`` turns the repack off. (Paged optimizers need CUDA: see policies.optimizer.)
"""

from __future__ import annotations

from lorafit.core import libs


def bnb_config(spec, *, fsdp: bool = False):
    """transformers.BitsAndBytesConfig for the recipe's quantization section, or None when bits is null.

    Under FSDP the 4-bit weights are stored in the compute dtype (bnb_4bit_quant_storage): FSDP flattens and
    shards every parameter of a unit together, and refuses to mix uint8 storage with bf16/fp16 parameters."""
    if spec.bits is None:
        return None
    libs.prepare()
    import torch
    from transformers import BitsAndBytesConfig

    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
                              **({"bnb_4bit_quant_storage": getattr(torch, spec.compute_dtype)} if fsdp else {}))


def describe(spec, device: str) -> str:
    """The one line lorafit says when it quantizes (what bitsandbytes would otherwise say in its own words)."""
    from importlib import metadata

    kind = "8-bit" if spec.bits == 8 else f"4-bit {spec.quant_type}" + (" + double quant" if spec.double_quant else "")
    version = metadata.version("bitsandbytes")
    return f"base weights in {kind}, compute {spec.compute_dtype}, bitsandbytes {version} on {device}"


def cpu_safe(model) -> None:
    """Stop every bnb Linear4bit from repacking its weights for the AVX512-BF16 CPU inference kernel.

    The repack happens on the first eval-mode, no-grad forward on such CPUs and is not undone for the
    training forwards that follow, whose gradients then come out wrong without any error. Call this
    after loading any 4-bit model (training, evaluation, merge gap); a no-op without 4-bit layers.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes, so no Linear4bit
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            weight = module.weight
            state = getattr(weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):  # already repacked: undo
                weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
                module.quant_state = weight.quant_state
