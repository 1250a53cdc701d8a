"""Quantize stage: make a base loaded through bitsandbytes (core.quantization) trainable.

Order in the pipeline: ``load_model`` (with ``bnb_config``) → ``prepare_quantized`` → LoRA injection.
"""

from __future__ import annotations

import warnings

from lorafit.core.policies import GRADIENT_CHECKPOINTING_KWARGS
from lorafit.core.quantization import cpu_safe


def prepare_quantized(model, spec, *, gradient_checkpointing: bool):
    """After from_pretrained, before LoRA: peft's k-bit preparation and the CPU work-around. Returns the model."""
    from peft import prepare_model_for_kbit_training

    with warnings.catch_warnings():
        # peft calls transformers' gradient_checkpointing_* names, deprecated in v5: not the user's concern.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is deprecated and will be removed in v6.*")
        # Norms (and other non-quantized weights) go to fp32; the embeddings' output requires grad so that
        # checkpointed blocks over a frozen base still carry gradients back to the LoRA weights.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=GRADIENT_CHECKPOINTING_KWARGS if gradient_checkpointing else None)
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    cpu_safe(model)
    return model
