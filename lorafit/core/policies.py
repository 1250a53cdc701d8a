"""Decisions a run makes from its recipe and its machine, each made once.

``train``, ``validate``, ``estimate`` and the commands that reload a model all call these, so that
``estimate`` can never describe a run that ``train`` would not do. *device* is ``None`` for this
machine, or ``"cuda"`` / ``"cpu"`` for a hypothetical one (estimate plans both).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Machine:
    """This machine as every decision here reads it."""

    device: str       # "cuda" | "cpu"
    bf16: bool        # the GPU computes in bfloat16 itself (compute capability 8.0+, or ROCm); False on CPU
    name: str = "cpu"


def machine() -> Machine:
    """The one capability check: which device trains, and whether it computes in bf16. Not torch's
    is_bf16_supported(), which says yes on a V100 or T4 where bf16 is only emulated (slowly)."""
    import torch

    if not torch.cuda.is_available():
        return Machine("cpu", bf16=False)
    native = bool(torch.version.hip) or torch.cuda.get_device_capability()[0] >= 8
    return Machine("cuda", bf16=native, name=torch.cuda.get_device_name())


def this_device() -> str:
    return machine().device


def precision(training: TrainingSpec, device: str | None = None) -> str:
    """auto → bf16 on a GPU that computes in it, else fp32 (CPU bf16 autocast is slower than fp32 on most CPUs).

    On this machine (*device* None) fp16 without CUDA, and bf16 on a GPU without it, are the user's mistakes,
    refused before anything loads; a plan for a hypothetical device assumes a GPU with bf16."""
    if device is None:
        here = machine()
        if training.precision == "fp16" and here.device != "cuda":
            raise ModelError("fp16 mixed precision needs a CUDA GPU", where="training.precision",
                             fix="use precision: bf16, fp32 or auto on CPU")
        if training.precision == "bf16" and here.device == "cuda" and not here.bf16:
            raise ModelError(f"bf16 needs a GPU that computes in bfloat16 (compute capability 8.0 or newer: A100, "
                             f"H100, L4, RTX 30xx/40xx ...), and this {here.name} does not", where="training.precision",
                             fix="set precision: auto (bf16 where the GPU has it, else fp32), or fp16")
        bf16_ok = here.device == "cuda" and here.bf16
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



def check_prompts(recipe: Recipe, config, tokenizer) -> None:
    """evaluation.prompts that, rendered as training renders its rows, leave no room in the model's context
    for evaluation.max_new_tokens (64 when unset): refused before training, not after it (GPT-2-style
    position embeddings would fail on them; rotary ones would answer past what the model knows)."""
    spec = recipe.evaluation
    if not spec.prompts or not tasks.task(recipe.model.task).causal:
        return
    found = context_limit(config, tokenizer)
    if not found:
        return
    from lorafit.core.generation import prompt_ids

    new = spec.max_new_tokens or 64
    for i, prompt in enumerate(spec.prompts):
        n = len(prompt_ids(prompt, tokenizer, recipe.data))
        if n + new > found[0]:
            raise RecipeError(f"this prompt is {n} tokens as the model is asked it; with {new} new tokens that is "
                              f"above the context of {recipe.model.name} ({found[0]} tokens, its {found[1]})",
                              where=f"evaluation.prompts[{i}]",
                              fix=f"shorten it to at most {max(found[0] - new, 0)} tokens"
                                  + (", or lower evaluation.max_new_tokens" if found[0] > n else ""))

# ----------------------------------------------------------------------------------------------
# CUDA speed levers (docs/performance.md, "On CUDA"): decided here, refused at validate time where they
# cannot run, so that a run never loads gigabytes of weights to fail on a missing kernel.

# FlashAttention implementations → the module each needs.
FLASH_ATTENTION = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
_FLASH_INSTALL = {
    "flash_attention_2": "{python} -m pip install flash-attn --no-build-isolation",
    "flash_attention_3": "build FlashAttention-3 from the hopper/ directory of github.com/Dao-AILab/flash-attention",
}
HALF_DTYPES = ("bfloat16", "float16")


def has_module(name: str) -> bool:
    """*name* can be imported (looked up, not imported: flash_attn and liger_kernel pull in CUDA/Triton)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def supports_flash_attention(config, task: str) -> bool | None:
    """Whether the class transformers builds for *config* and *task* has a FlashAttention path; None when
    that cannot be told without loading it (remote code, a config transformers does not map)."""
    try:
        model_class = tasks.auto_model_class(task)._model_mapping[type(config)]
    except Exception:  # KeyError, or a mapping that cannot import its class
        return None
    return bool(getattr(model_class, "_supports_flash_attn", False))


def attention(model: ModelSpec, dtype: str, config=None, device: str | None = None) -> str | None:
    """The attn_implementation training passes to from_pretrained; None leaves transformers' default (sdpa
    where the model has it, else eager). auto → flash_attention_2 where it can run: CUDA, the flash_attn
    package, half-precision weights, and a model class known to support it."""
    if model.attn_implementation != "auto":
        return model.attn_implementation
    if ((device or this_device()) == "cuda" and dtype in HALF_DTYPES and has_module("flash_attn")
            and config is not None and supports_flash_attention(config, model.task)
            and flash_attention_runs("flash_attention_2")):
        return "flash_attention_2"
    return None


# FlashAttention-2 needs an Ampere or newer GPU (compute capability 8), FlashAttention-3 a Hopper (9).
FLASH_MIN_CAPABILITY = {"flash_attention_2": 8, "flash_attention_3": 9}


def flash_attention_runs(impl: str) -> bool:
    """This GPU is new enough for *impl*, and its module really imports (a build for another torch passes
    find_spec, then fails with undefined symbols). Called only where CUDA is present: it imports the module."""
    import importlib

    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < FLASH_MIN_CAPABILITY[impl]:
        return False
    try:
        importlib.import_module(FLASH_ATTENTION[impl])
    except Exception:  # ImportError, OSError (undefined symbol), a CUDA mismatch
        return False
    return True


def check_attention(model: ModelSpec, dtype: str, config=None, device: str | None = None) -> None:
    """An explicit flash_attention_* that cannot run here: refused before any weights load."""
    import sys

    impl = model.attn_implementation
    if impl not in FLASH_ATTENTION:
        return
    where = "model.attn_implementation"
    if (device or this_device()) != "cuda":
        raise RecipeError(f"{impl} needs a CUDA GPU, and this machine has none", where=where,
                          fix="set model.attn_implementation: sdpa (or auto, which picks FlashAttention only where "
                              "it can run)")
    module = FLASH_ATTENTION[impl]
    if not has_module(module):
        raise RecipeError(f"{impl} needs the {module} module, which is not installed", where=where,
                          fix=_FLASH_INSTALL[impl].format(python=sys.executable)
                          + ", or set model.attn_implementation: sdpa")
    if not flash_attention_runs(impl):
        raise RecipeError(f"{impl} does not run here: it needs a GPU of compute capability "
                          f"{FLASH_MIN_CAPABILITY[impl]}.0 or newer and a {module} build that imports with this torch",
                          where=where, fix="set model.attn_implementation: sdpa (or auto)")
    if dtype not in HALF_DTYPES:
        raise RecipeError(f"{impl} runs in bf16/fp16 only, and the weights load in {dtype}", where=where,
                          fix="set training.precision: bf16 (or auto), or model.attn_implementation: sdpa")
    if config is not None and supports_flash_attention(config, model.task) is False:
        raise RecipeError(f"transformers has no FlashAttention path for model type '{config.model_type}' "
                          f"({model.task})", where=where, fix="set model.attn_implementation: sdpa or auto")


def liger_supports(model_type: str | None) -> bool:
    """liger_kernel has kernels for *model_type* (its own table; False when it is not installed)."""
    if not model_type or not has_module("liger_kernel"):
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # ImportError, or Triton failing to initialise
        return False
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def liger(training: TrainingSpec, task: str, model_type: str | None, device: str | None = None) -> bool:
    """Whether the Trainer applies Liger kernels (use_liger_kernel). auto: causal_lm on CUDA with the package
    and kernels for the model type; true: on (check_liger refused already where it cannot run)."""
    if training.liger is False:
        return False
    if training.liger is True:
        return True
    return tasks.task(task).causal and (device or this_device()) == "cuda" and liger_supports(model_type)


def check_liger(training: TrainingSpec, model_type: str | None, device: str | None = None) -> None:
    """training.liger: true where Liger cannot run: refused before training."""
    import sys

    if training.liger is not True:
        return
    where, off = "training.liger", "set training.liger: auto (on only where it can run) or false"
    if (device or this_device()) != "cuda":
        raise RecipeError("Liger kernels (Triton) need a CUDA GPU, and this machine has none", where=where, fix=off)
    if not has_module("liger_kernel"):
        raise RecipeError("the liger_kernel package is not installed", where=where,
                          fix=f"install it ({sys.executable} -m pip install liger-kernel), or {off}")
    if not liger_supports(model_type):
        raise RecipeError(f"liger_kernel has no kernels for model type '{model_type}'", where=where, fix=off)


# report_to → the module the tracker needs, and the package that provides it.
TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
            "mlflow": (("mlflow",), "mlflow")}


def check_tracker(report_to: str) -> None:
    """training.report_to names a tracker that is installed (else Trainer fails after the model loads)."""
    import sys

    if report_to not in TRACKERS:
        return
    modules, package = TRACKERS[report_to]
    if not any(has_module(m) for m in modules):
        raise RecipeError(f"{report_to} is not installed", where="training.report_to",
                          fix=f"install it ({sys.executable} -m pip install {package}) or set "
                              "training.report_to: none")
