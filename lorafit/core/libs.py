"""The libraries as lorafit runs them: their chatter kept out of lorafit's output, their network look-ups
kept to what a command needs.

``prepare()`` runs first in every process (cli.main, and every entry that loads a model); it imports
nothing heavy. What it handles, each found on a real run:

- bitsandbytes, imported (by peft, at every command) on a CPU with AVX512-BF16, asks the hub for a compiled
  kernel (``kernels-community/quantization-bitsandbytes``) through the ``kernels`` package: a network
  request at every start, then "Skipping publisher trust check ..." and "Failed to load CPU
  gemm_4bit_forward ... Set trust_remote_code=True ..." on stderr. lorafit never runs that kernel (it turns
  the AVX512-BF16 path off, core.quantization.cpu_safe) and never downloads code unasked: the look-up runs
  with the hub offline, and its two lines are dropped.
- peft, saving an adapter whose base is a hub id, asks the hub whether the base's vocabulary changed, and
  offline says "Unable to fetch remote file ... Name or service not known". lorafit never resizes
  embeddings: ``save_adapter`` passes ``save_embedding_layers=False``; the Trainer's checkpoints save
  inside ``no_vocabulary_lookup()``.
- bitsandbytes' import notices and per-forward cast warnings, transformers' and datasets' progress bars,
  deprecation notices about names lorafit or peft use internally.

INTERNALS lists, in one place, every private part of a library lorafit relies on (a Trainer method it
overrides, a bitsandbytes function, a GGUF reader, an attribute set at runtime), where and why; each is
checked against the installed versions by tests/unit/test_library_internals.py, which fails naming the
internal when a release removes or renames it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import warnings

# Messages that tell a lorafit user nothing they can act on: (logger names they come through, pattern).
_NOISE = [
    r".*inputs will be cast from .* to float16 during quantization",  # MatMul8bitLt, once per forward
    r".*Input type into Linear4bit is torch\.float16, but bnb_4bit_compute_dtype=torch\.float32.*",
    r".*compiled without GPU support.*",
    r".*XPU/CPU can run without native library.*",
    r".*No supported devices found for bitsandbytes.*",
    r".*bitsandbytes library load error.*",
    r".*8-bit optimizers.*(GPU|CUDA) (support|not available).*",
    r".*Failed to load CPU gemm_4bit_forward.*",         # bitsandbytes' hub-kernel look-up failed (see above)
    r".*Skipping publisher trust check for .*",          # kernels, asked offline
    r".*Unable to fetch remote file .*",                 # peft's vocabulary look-up, offline
    r".*Could not find a config file in .* vocabulary was not modified.*",  # the same, HF_HUB_OFFLINE set
]
_NOISE_RE = re.compile("|".join(f"(?:{p})" for p in _NOISE), re.DOTALL)
# Filters sit on the logger that emits: a record of a child logger skips its parents' filters.
_NOISY_LOGGERS = ("bitsandbytes", "bitsandbytes.cextension", "bitsandbytes.autograd._functions",
                  "bitsandbytes.nn.modules", "bitsandbytes.optim.optimizer", "bitsandbytes.backends.cpu.ops",
                  "bitsandbytes.backends.mps.ops", "kernels._internals.hf_hub", "peft.utils.other",
                  "transformers.integrations.bitsandbytes", "transformers.quantizers.quantizer_bnb_4bit",
                  "transformers.quantizers.quantizer_bnb_8bit")
# The bitsandbytes modules that look a kernel up on the hub when imported (CPU with AVX512-BF16; Apple MPS).
_KERNEL_LOOKUP_MODULES = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.backends.mps.ops")
_prepared = False

# Private internals of the libraries, "module[:object.attribute][(parameters it is called with)]" → where lorafit
# relies on it and why. An attribute set at runtime (in __init__, by a function) counts as present while the
# module still assigns it. A module not installed (an optional extra) is skipped.
INTERNALS: dict[str, str] = {
    # transformers' Trainer: methods stages/train.py overrides or calls, attributes it reads
    "transformers:Trainer._get_train_sampler(train_dataset)":
        "stages/train.py: training.group_by_length sorts the whole epoch by length (stages/sampler.py)",
    "transformers:Trainer._run_epoch(model, epoch)":
        "stages/train.py: hands the epoch to the length-bucketed sampler (DDP and resumed epochs)",
    "transformers:Trainer._track_num_input_tokens(inputs)":
        "stages/train.py: packed batches count their real tokens from the position ids",
    "transformers:Trainer._get_output_dir(trial)": "stages/train.py: checkpoints are written into a staging dir",
    "transformers:Trainer._save_checkpoint(model, trial)":
        "stages/train.py: a checkpoint appears whole (staged, then renamed into place)",
    "transformers:Trainer._train_batch_size": "stages/train.py: the per-device batch the length buckets are cut into",
    "transformers.trainer_utils:rotate_checkpoints(output_dir, save_total_limit, best_model_checkpoint, use_mtime)":
        "stages/train.py: training.save_total_limit after a staged checkpoint",
    # transformers: models, configs, tokenizers
    "transformers:PretrainedConfig._attn_implementation":
        "core/models.py, stages/packing.py: the attention implementation transformers resolved",
    "transformers.models.auto.auto_factory:_BaseAutoModelClass._model_mapping":
        "core/policies.py: the model class an Auto class builds for a config (has it a FlashAttention path?)",
    "transformers:PreTrainedModel._supports_flash_attn": "core/policies.py: whether that class has a FlashAttention path",
    "transformers:PreTrainedTokenizerFast._tokenizer":
        "core/models.py: add_prefix_space turned on for token_cls' byte-level BPE (prefix_space_for_words)",
    "transformers.utils.hub:convert_file_size_to_int": "commands/merge.py: --max-shard-size read as save_pretrained does",
    # transformers' GGUF readers
    "transformers.integrations.gguf.reader:read_gguf_metadata(gguf_path)":
        "core/gguf.py, tools/tiny.py: a GGUF's metadata in milliseconds (validate reads no tensor)",
    "transformers.integrations.gguf.reader:GgufHeader.from_file": "core/gguf.py: the dtype a GGUF dequantizes to",
    "transformers.modeling_gguf_pytorch_utils:load_gguf_checkpoint(gguf_checkpoint_path, return_tensors)":
        "core/gguf.py: the metadata parsed once per file and process (gguf_metadata_memo)",
    "transformers.modeling_gguf_pytorch_utils:get_gguf_hf_weights_map(hf_model, processor)":
        "core/gguf.py: file tensors the legacy reader would skip silently are recorded (every tensor must map); "
        "validate's mapping check names each file tensor's parameter on a meta model (check_tensor_names)",
    "transformers.modeling_gguf_pytorch_utils:TENSOR_PROCESSORS":
        "core/gguf.py: the legacy reader's per-architecture name rules, for check_tensor_names",
    "transformers.integrations.gguf.utils:is_gguf_arch_supported(gguf_arch)":
        "core/gguf.py: architectures the newer GGUF reader renames itself (left to the conversion's check)",
    "transformers.modeling_gguf_pytorch_utils:tqdm":
        "core/gguf.py, export/gguf_verify.py: the legacy reader's raw progress bar silenced",
    # gguf-py (the converters' own copy, run by export/llamacpp.py; the same code as the installed gguf's)
    "gguf.scripts.gguf_new_metadata:copy_with_new_metadata(reader, writer, new_metadata, remove_metadata)":
        "export/llamacpp.py: the end-of-turn token and the system prompt added to an exported GGUF's metadata",
    "gguf.scripts.gguf_new_metadata:MetadataDetails": "export/llamacpp.py: the values of those metadata keys",
    # bitsandbytes
    "bitsandbytes.functional:_convert_weight_packed_for_cpu_inverse":
        "core/quantization.py: a 4-bit layer's AVX512-BF16 CPU repack undone (it breaks later gradients)",
    "bitsandbytes.nn:Linear4bit.support_avx512bf16_for_cpu": "core/quantization.py: that repack turned off",
    "bitsandbytes.functional:QuantState.packing_format_for_cpu": "core/quantization.py: whether a layer was repacked",
    "bitsandbytes.backends.cpu.ops": "core/libs.py: imported with the hub offline (its kernel look-up)",
    "bitsandbytes.backends.mps.ops": "core/libs.py: imported with the hub offline (its kernel look-up)",
    # huggingface_hub, kernels
    "huggingface_hub.constants:HF_HUB_OFFLINE":
        "core/libs.py: set while bitsandbytes looks a kernel up (kernels reads it at call time)",
    "kernels._internals.hf_hub": "core/libs.py: the logger whose offline look-up notice is dropped",
    # datasets, peft, torch, typer, optuna; optional: deepspeed, liger_kernel
    "datasets:Dataset._fingerprint": "stages/data/read.py: a hub dataset's fingerprint keys the tokenized rows' cache",
    "peft.utils.other:get_pattern_key": "core/merge_streaming.py: lora alpha_pattern resolved as peft does",
    "peft.utils.other:ModulesToSaveWrapper": "core/targets.py: the heads trained in full, counted",
    "torch:UntypedStorage._cdata": "core/memory.py: each saved tensor's storage counted once in the activation trace",
    "typer._click.exceptions:UsageError": "cli.py: usage errors of the click that typer vendors",
    "optuna.trial:FrozenTrial._trial_id": "sweep/study.py: a finished trial reopened (Optuna has no public accessor)",
    "deepspeed.runtime.engine:DeepSpeedEngine._zero3_consolidated_16bit_state_dict":
        "core/distributed.py: ZeRO-3's adapter gathered without the frozen base",
    "liger_kernel.transformers.monkey_patch:MODEL_TYPE_TO_APPLY_LIGER_FN":
        "core/policies.py: the model types Liger has kernels for",
}


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE_RE.match(record.getMessage())


class _OfflineKernelLookup(importlib.abc.MetaPathFinder):
    """Runs the import of bitsandbytes' kernel-lookup modules with the hub offline (kernels reads
    huggingface_hub.constants.HF_HUB_OFFLINE when it is called): the look-up then fails at once, without a
    request, and bitsandbytes keeps its own CPU code."""

    def find_spec(self, name, path=None, target=None):
        if name not in _KERNEL_LOOKUP_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_offline(module):
            with _hub_offline():
                exec_module(module)

        spec.loader.exec_module = exec_offline
        return spec


@contextlib.contextmanager
def _hub_offline():
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def prepare() -> None:
    """Before any library is imported: filters on the loggers and warnings above, and the offline kernel
    look-up. Cheap (imports nothing heavy); idempotent."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    noise = _NoiseFilter()
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(noise)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # Deprecation notices about names lorafit (or peft) uses internally are not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is deprecated and will be removed in v6.*")
    if not any(isinstance(f, _OfflineKernelLookup) for f in sys.meta_path):
        sys.meta_path.insert(0, _OfflineKernelLookup())


def quiet_libraries() -> None:
    """Our progress bar and warnings are the ones users read: the libraries' bars and chatter off."""
    prepare()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@contextlib.contextmanager
def no_vocabulary_lookup():
    """peft's save_pretrained, when it is not told whether embeddings were saved, asks the hub whether the
    base's vocabulary changed (a request per save, a warning offline). lorafit never resizes embeddings:
    the Trainer's checkpoint saves, which cannot pass save_embedding_layers, run inside this (peft reads
    HF_HUB_OFFLINE from the environment at each save)."""
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def versions() -> dict:
    """lorafit's, Python's and the libraries' versions, for metrics.json (a rerun needs them)."""
    import importlib.metadata as md
    import platform

    from lorafit import __version__

    found = {"lorafit": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return found
