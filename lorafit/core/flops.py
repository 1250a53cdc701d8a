"""Model FLOPs of LoRA training, achieved TFLOPS and MFU (model FLOPs utilisation) for metrics.json.

FLOPs per trained token (docs/performance.md, "On CUDA"):

    4·N_frozen + 6·N_trained + 12·n_layers·d_attn·T

- N counts the weights of every matmul: the linear layers of each block, the LoRA A and B matrices, the
  lm_head (or classifier head), but not the embedding lookup, which is no matmul; N_trained are those
  trained (LoRA, modules_to_save), N_frozen the rest.
- A weight costs 2 FLOPs per token forward (a multiply and an add) and, backward, 2 for its input's
  gradient and 2 for its own: 6 for a trained weight, Kaplan et al. 2020's and Chinchilla's (Hoffmann et
  al. 2022) 6N; 4 for a frozen one, whose gradient LoRA never computes but whose input gradient carries the
  loss back to the LoRA weights of earlier layers. (The first layer's frozen weights need no input gradient:
  that ~1/n_layers of 2·N_frozen is counted anyway.)
- Attention's score and value products have no weights: 12·n_layers·d_attn·T per token forward + backward
  (PaLM, Chowdhery et al. 2022, appendix B; d_attn = heads × head dim, T the sequence length, the whole T×T
  score matrix counted as PaLM does). The backward through attention is the same under LoRA as in full
  training, since the gradient must still reach earlier layers. T is the token-weighted mean row length,
  Σs²/Σs over the rows of the train split (packed rows count as the rows they are: attention stays inside
  each).
- Model FLOPs, as MFU defines them (PaLM B): recomputation by gradient checkpointing is not counted.

Encoder-decoder models (seq2seq_lm) are not counted: their encoder and decoder see different tokens.
"""

from __future__ import annotations

import re

from lorafit.core import tasks

# Peak dense (no 2:4 sparsity) bf16 / fp16 tensor-core TFLOPS by CUDA device name (torch.cuda.get_device_name),
# first match wins. Sources: NVIDIA's datasheets, which print the sparsity figures, twice these (H100/H200: the
# H100 and H200 datasheets, 1,979 → 989 SXM, 1,513 → 756 PCIe, 1,671 → 835 NVL; A100: 624 → 312; L40S: 733 → 362;
# L4: 242 → 121; A10: 250 → 125), the Ada and Ampere GeForce whitepapers for the RTX 4090 / 3090 (FP16/BF16
# tensor with FP32 accumulate, as training accumulates: 165.2 / 71), and the T4 / V100 datasheets (fp16 only: no
# bf16 tensor cores). A10G: AWS publishes no figure; the A10's 125 is used (as PyTorch Lightning's table does).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"\bgh200\b", {"bf16": 989.0, "fp16": 989.0}),
    (r"\bh200\b.*\bnvl\b", {"bf16": 835.0, "fp16": 835.0}),
    (r"\bh200\b", {"bf16": 989.0, "fp16": 989.0}),
    (r"\bh100\b.*\bnvl\b", {"bf16": 835.0, "fp16": 835.0}),
    (r"\bh100\b.*(pcie|hbm2e)", {"bf16": 756.0, "fp16": 756.0}),
    (r"\bh100\b", {"bf16": 989.0, "fp16": 989.0}),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\ba100\b", {"bf16": 312.0, "fp16": 312.0}),
    (r"\ba10g\b", {"bf16": 125.0, "fp16": 125.0}),
    (r"\ba10\b", {"bf16": 125.0, "fp16": 125.0}),
    (r"\bl40s\b", {"bf16": 362.0, "fp16": 362.0}),
    (r"\bl4\b", {"bf16": 121.0, "fp16": 121.0}),
    (r"\brtx 4090\b", {"bf16": 165.2, "fp16": 165.2}),
    (r"\brtx 3090\b", {"bf16": 71.0, "fp16": 71.0}),
    (r"\bt4\b", {"fp16": 65.0}),
    (r"\bv100\b.*pcie", {"fp16": 112.0}),
    (r"\bv100\b", {"fp16": 125.0}),
]


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """Peak dense tensor TFLOPS of one device for *precision* (bf16 / fp16); None when unknown (a device not
    in the table, fp32, or a CPU)."""
    if not device_name or precision not in ("bf16", "fp16"):
        return None
    name = device_name.lower()
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks.get(precision)
    return None


def matmul_params(model) -> tuple[int, int]:
    """(frozen, trained) weights of the matmuls a forward pass runs: every nn.Linear (bitsandbytes' 4/8-bit
    layers are ones; counted by in × out, whatever their storage) and GPT-2's Conv1D. peft's copy of a
    modules_to_save module that the forward no longer uses (original_module) is left out."""
    import torch

    frozen = trained = 0
    for name, module in model.named_modules():
        if ".original_module" in f".{name}":
            continue
        if isinstance(module, torch.nn.Linear):
            n = module.in_features * module.out_features
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
            n = module.nf * module.nx
        else:
            continue
        if module.weight.requires_grad:
            trained += n
        else:
            frozen += n
    return frozen, trained


def attention_dims(config) -> tuple[int, int]:
    """(layers, d_attn = query heads × head dim) from a decoder-only or encoder-only config."""
    config = getattr(config, "text_config", None) or config
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads * head_dim


def attention_length(dataset) -> float:
    """Token-weighted mean length of the rows of a tokenised split, Σs²/Σs (the T of the attention term).
    A packed split's rows are found from its position ids: a row of s tokens has positions 0..s-1, and
    Σ(2p+1) over them is s²."""
    import pyarrow.compute as pc

    columns = dataset.with_format("arrow")  # the split's own rows (a held-out split is an index over a table)
    if "position_ids" in dataset.column_names:
        positions = pc.list_flatten(columns["position_ids"])
        tokens = len(positions)
        squares = pc.sum(pc.add(pc.multiply(positions, 2), 1)).as_py() or 0
    else:
        import pyarrow as pa

        lengths = pc.cast(pc.list_value_length(columns["input_ids"]), pa.int64())  # int32 squares overflow at 46k
        tokens = pc.sum(lengths).as_py() or 0
        squares = pc.sum(pc.multiply(lengths, lengths)).as_py() or 0
    return squares / tokens if tokens else 0.0


def flops_per_token(frozen: int, trained: int, layers: int, d_attn: int, seq_len: float) -> float:
    """Model FLOPs of one trained token (the module docstring's formula)."""
    return 4 * frozen + 6 * trained + 12 * layers * d_attn * seq_len


def device_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else None


def train_throughput(model, dataset, *, task: str, tokens_per_second: float | None, precision: str,
                     world_size: int = 1, device: str | None = None) -> dict:
    """metrics.json's train.model_flops_per_token, model_tflops_per_second (all processes together) and mfu
    (that over world_size × the device's peak; None where the peak is not known: CPU, fp32, a device not in
    PEAK_TFLOPS). *device*: the CUDA device name, default this machine's."""
    unknown = {"model_flops_per_token": None, "model_tflops_per_second": None, "mfu": None}
    if tasks.task(task).encoder_decoder:
        return unknown
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        layers, d_attn = attention_dims(base.config)
    except (AttributeError, TypeError, ZeroDivisionError):  # a config without the usual names: no figure, no crash
        return unknown  # (this runs between training and saving the adapter)
    frozen, trained = matmul_params(model)
    per_token = flops_per_token(frozen, trained, layers, d_attn, attention_length(dataset))
    achieved = per_token * tokens_per_second / 1e12 if tokens_per_second else None
    peak = peak_tflops(device if device is not None else device_name(), precision)
    return {
        "model_flops_per_token": round(per_token),
        "model_tflops_per_second": _significant(achieved),
        "mfu": _significant(achieved / (peak * world_size)) if achieved is not None and peak else None,
    }


def train_throughput_or_none(model, dataset, **kwargs) -> dict:
    """train_throughput, or nulls with a warning: it runs between training and saving the adapter, and a figure
    it cannot compute must never cost the run."""
    try:
        return train_throughput(model, dataset, **kwargs)
    except Exception as e:  # an unusual config or dataset: no figure, the adapter still saved
        from lorafit import log

        log.warn(f"model FLOPs not computed ({type(e).__name__}: {e}); metrics.json has no MFU for this run")
        return {"model_flops_per_token": None, "model_tflops_per_second": None, "mfu": None}


def _significant(x: float | None, digits: int = 4) -> float | None:
    """4 significant digits: a tiny model on a CPU does 0.0016 TFLOPS, a 7B on an H100 hundreds."""
    return float(f"{x:.{digits}g}") if x is not None else None
