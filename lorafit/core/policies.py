"""Decisions a run makes from its recipe and its machine, each made once.

``train``, ``validate``, ``estimate`` and the commands that reload a model all call these, so that
``estimate`` can never describe a run that ``train`` would not do. *device* is ``None`` for this
machine, or ``"cuda"`` / ``"cpu"`` for a hypothetical one (estimate plans both).
"""

from __future__ import annotations

from lorafit import log
from lorafit.core import tasks
from lorafit.errors import ModelError, RecipeError
from lorafit.recipe import DataSpec, LoraSpec, ModelSpec, QuantizationSpec, Recipe, TrainingSpec

PRECISION_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Trainer optimizers that run on CPU in place of the CUDA-only paged ones (same update rule, not paged).
CPU_OPTIM = {"paged_adamw_8bit": "adamw_torch", "paged_adamw_32bit": "adamw_torch"}
# Non-reentrant checkpointing: gradients reach LoRA weights behind frozen blocks without relying on
# inputs that require grad, and it is what PyTorch recommends. Training and k-bit preparation share it.
GRADIENT_CHECKPOINTING_KWARGS = {"use_reentrant": False}


def this_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def precision(training: TrainingSpec, device: str | None = None) -> str:
    """auto → bf16 on a GPU that supports it, else fp32 (CPU bf16 autocast is slower than fp32 on most CPUs).

    On this machine (*device* None) fp16 without CUDA is the user's mistake; a plan for a hypothetical
    device assumes a GPU with bf16."""
    if device is None:
        import torch

        cuda = torch.cuda.is_available()
        if training.precision == "fp16" and not cuda:
            raise ModelError("fp16 mixed precision needs a CUDA GPU", where="training.precision",
                             fix="use precision: bf16, fp32 or auto on CPU")
        bf16_ok = cuda and torch.cuda.is_bf16_supported()
    else:
        bf16_ok = device == "cuda"
    if training.precision != "auto":
        return training.precision
    return "bf16" if bf16_ok else "fp32"


def weights_dtype(model: ModelSpec, quant: QuantizationSpec, precision_: str, device: str | None = None) -> str:
    """dtype name the base is loaded in. Quantized: the unquantized parts take the compute dtype on GPU,
    fp32 on CPU (bitsandbytes' CPU kernels); otherwise model.dtype, else the training precision's."""
    if quant.bits is not None:
        return quant.compute_dtype if (device or this_device()) == "cuda" else "float32"
    if model.dtype != "auto":
        return model.dtype
    return PRECISION_DTYPE[precision_]


def gradient_checkpointing(recipe: Recipe) -> bool:
    """On when the recipe says so; by default on for quantized bases (QLoRA), off otherwise."""
    flag = recipe.training.gradient_checkpointing
    return flag if flag is not None else recipe.quantization.bits is not None


def optimizer(name: str, device: str | None = None) -> str:
    """The Trainer optimizer to use: paged ones need CUDA, so on CPU another replaces them (and, on
    this machine, a warning says which)."""
    if name in CPU_OPTIM and (device or this_device()) == "cpu":
        if device is None:
            log.warn(f"training.optim: {name} needs CUDA; using {CPU_OPTIM[name]} on this CPU")
        return CPU_OPTIM[name]
    return name


def class_count(num_labels: int | None, label_names: list[str] | None) -> int | None:
    """The recipe's model.num_labels wins (the data may not show every class); else the data's classes."""
    if num_labels is not None:
        return num_labels
    return len(label_names) if label_names else None


def config_num_labels(model: ModelSpec, config) -> int | None:
    """Classes of a labelled task's head before any data is read: model.num_labels, else the config's."""
    if not tasks.task(model.task).labelled:
        return None
    return model.num_labels if model.num_labels is not None else getattr(config, "num_labels", 2)


def lora_config(spec: LoraSpec, task: str, target_keys: list[str], *, model=None, revision: str | None = None):
    """The peft LoraConfig a recipe asks for on *model*; *target_keys* from targets.resolve_targets."""
    from peft import LoraConfig

    # GPT-2's Conv1D stores weights transposed; peft must know, or it warns and flips it itself.
    conv1d = model is not None and any(type(m).__name__ == "Conv1D" for m in model.modules())
    return LoraConfig(
        fan_in_fan_out=conv1d,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_keys,
        bias=spec.bias,
        modules_to_save=spec.modules_to_save,
        layers_to_transform=spec.layers_to_transform,
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
        task_type=tasks.task(task).peft_task_type,
        revision=revision,
    )


# Where configs keep the longest sequence their position embeddings (or rotary scaling) were made for.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_limit(config, tokenizer=None) -> tuple[int, str] | None:
    """(tokens, where the number comes from): the config's position limit, else the tokenizer's
    model_max_length (when it sets one), else None."""
    for cfg in (config, getattr(config, "text_config", None)):
        for key in _CONTEXT_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value, f"config {key}"
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**8:  # transformers' "unset" is a huge number
        return limit, "tokenizer model_max_length"
    return None


def check_max_length(data: DataSpec, config, tokenizer, model_name: str) -> None:
    """data.max_length above the model's context would fail mid-training (or silently extrapolate)."""
    found = context_limit(config, tokenizer)
    if found and data.max_length > found[0]:
        raise RecipeError(f"{data.max_length} tokens is above the context of {model_name} ({found[0]} tokens, "
                          f"its {found[1]})", where="data.max_length",
                          fix=f"set data.max_length to {found[0]} or less")
