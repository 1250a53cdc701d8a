"""bitsandbytes for every model load: its config from the recipe, its noise silenced, its CPU trap disarmed.

Used wherever a base is loaded quantized (training, evaluation, generation, merge --verify's gap to the
quantized model). On CPU, Linear4bit repacks its weights for a fast AVX512-BF16 inference kernel the
first time it runs in eval mode without grad; training after that (an eval between steps) gets silently
wrong gradients. ``cpu_safe`` turns the repack off. (Paged optimizers need CUDA: see policies.optimizer.)
"""

from __future__ import annotations

import logging
import re
import warnings

# Messages bitsandbytes emits on every import / forward that tell the user nothing actionable.
_NOISE = [
    r".*inputs will be cast from .* to float16 during quantization",  # MatMul8bitLt, once per forward
    r".*Input type into Linear4bit is torch\.float16, but bnb_4bit_compute_dtype=torch\.float32.*",
    r".*compiled without GPU support.*",
    r".*XPU/CPU can run without native library.*",
    r".*No supported devices found for bitsandbytes.*",
    r".*bitsandbytes library load error.*",
    r".*8-bit optimizers.*(GPU|CUDA) (support|not available).*",
]
_NOISE_RE = re.compile("|".join(f"(?:{p})" for p in _NOISE), re.DOTALL)
_silenced = False


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE_RE.match(record.getMessage())


def silence_bitsandbytes() -> None:
    """Drop bitsandbytes' import chatter and per-forward cast notices; real warnings still show. Idempotent."""
    global _silenced
    if _silenced:
        return
    _silenced = True
    noise = _NoiseFilter()
    for name in ("bitsandbytes", "bitsandbytes.cextension", "bitsandbytes.autograd._functions",
                 "bitsandbytes.nn.modules", "bitsandbytes.optim.optimizer", "transformers.integrations.bitsandbytes",
                 "transformers.quantizers.quantizer_bnb_4bit", "transformers.quantizers.quantizer_bnb_8bit"):
        # A filter on the logger itself: records of child loggers skip their parents' filters.
        logging.getLogger(name).addFilter(noise)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)


def bnb_config(spec, *, fsdp: bool = False):
    """transformers.BitsAndBytesConfig for the recipe's quantization section, or None when bits is null.

    Under FSDP the 4-bit weights are stored in the compute dtype (bnb_4bit_quant_storage): FSDP flattens and
    shards every parameter of a unit together, and refuses to mix uint8 storage with bf16/fp16 parameters."""
    if spec.bits is None:
        return None
    silence_bitsandbytes()
    import torch
    from transformers import BitsAndBytesConfig

    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
                              **({"bnb_4bit_quant_storage": getattr(torch, spec.compute_dtype)} if fsdp else {}))


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
