"""The memory plan: exact trainable parameters and the memory (and disk) a recipe's run needs, without
weights. ``lorafit estimate`` prints it, ``validate`` its headline.

Parameters come from ``core.targets`` (the same resolution training uses). Memory is a sum of
parts, each written out with its assumption; activations are traced: the model with its LoRA layers
runs one forward on the meta device (no memory, no compute) and every tensor autograd keeps for the
backward pass is counted once. The model behind each number is explained in docs/estimate.md; the
JSON document (``schema_version`` 1) is described there too.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

from lorafit.core import policies, tasks
from lorafit.core import targets as T
from lorafit.recipe import QuantizationSpec, Recipe

SCHEMA_VERSION = 1
GiB = 1024 ** 3
MiB = 1024 ** 2

# bnb 4-bit: one fp32 absmax per block of 64 weights; double quantization stores absmax in 8 bits
# with one fp32 constant per 256 absmax values.
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
# Optimizer state, bytes per trainable (fp32) parameter. 8-bit bnb states carry an fp32 absmax per 256.
_Q8 = 1 + 4 / 256
OPTIMIZER_BYTES = {
    "adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8,
    "adamw_bnb_8bit": 2 * _Q8, "adamw_8bit": 2 * _Q8, "paged_adamw_8bit": 2 * _Q8,
    "lion_8bit": _Q8, "adagrad": 4, "sgd": 0, "adafactor": None,  # adafactor: factored, from shapes
}
# What a process needs before its first tensor: the CUDA context and kernels, or Python + torch on CPU.
RUNTIME_OVERHEAD = {"cuda": 512 * MiB, "cpu": 512 * MiB}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# The common rule of thumb, bytes for a 7B model: 16-bit LoRA and 4-bit QLoRA (batch 1, short sequences).
RULE_OF_THUMB_7B = {"lora": 16e9, "qlora": 6e9}


# ----------------------------------------------------------------------------------------------
# The report


def estimate(recipe: Recipe) -> dict:
    """The report behind ``lorafit estimate`` (a JSON-ready dict). Raises ModelError / RecipeError."""
    spec, lora = recipe.model, recipe.lora
    config = T.load_config(spec.name, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                           gguf_file=spec.gguf_file, config_only=True)  # validate has loaded it already
    num_labels = policies.config_num_labels(spec, config)
    meta = T.build_meta_model(config, spec.task, trust_remote_code=spec.trust_remote_code, num_labels=num_labels)
    keys, chosen = T.resolve_targets(meta, lora.target_modules, model_name=spec.name)
    count = T.count_trainable(meta, chosen, r=lora.r, task=spec.task, lora=lora)
    parts = _param_parts(meta, chosen, count, lora)

    kind, memory = device_memory()
    plans = OrderedDict((dev, plan(recipe, config, keys, parts, count, dev, num_labels)) for dev in ("cuda", "cpu"))
    mine = plans[kind]
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": spec.name, "model_type": getattr(config, "model_type", None),
                  "architecture": type(meta).__name__, "task": spec.task, "total_params": count.base_params,
                  "num_labels": num_labels},
        "trainable": {
            "trainable_params": count.trainable,
            "percent": round(count.percent, 4),
            "all_params": count.all_params,
            "lora_params": count.lora,
            "dora_params": count.dora,
            "bias_params": count.bias,
            "modules_to_save_params": count.modules_to_save,
            "adapted_modules": count.adapted_modules,
            "target_modules": keys,
            "modules_to_save": list(count.saved_modules),
            "r": lora.r,
        },
        "plans": plans,
        "device": {"kind": kind, "memory_bytes": memory, "plan": kind,
                   "fits": mine["total_bytes"] <= memory},
        "rule_of_thumb": rule_of_thumb(recipe, count.base_params),
        "disk": disk_plan(recipe, mine),
        "layout": T.layout(meta, chosen),  # what validate's advice asks of the model (core/advice.py)
    }


def _param_parts(meta, chosen, count: T.TrainableCount, lora) -> dict:
    """Parameter counts the memory plan needs: what bitsandbytes would quantize, and what is not."""
    linear_weights = sum(m.in_features * m.out_features for m in T.linear_modules(meta))
    int8_rows = sum(m.out_features for m in T.linear_modules(meta))
    # Adafactor keeps rows + columns of each 2-D trainable matrix, the full size of 1-D ones.
    adapted = [m for m in chosen if lora.layers_to_transform is None
               or T.layer_index(m.name) in lora.layers_to_transform]
    adafactor = sum(2 * lora.r + m.in_features + m.out_features for m in adapted)
    adafactor += count.dora + count.bias + count.modules_to_save
    return {"linear_weights": linear_weights, "int8_rows": int8_rows, "other": count.base_params - linear_weights,
            "adafactor_floats": adafactor}


def plan(recipe: Recipe, config, keys: list[str], parts: dict, count: T.TrainableCount, device: str,
         num_labels: int | None) -> dict:
    """Memory on one device (cuda | cpu) for one training process, in bytes, with its assumptions."""
    tr, q = recipe.training, recipe.quantization
    notes: list[str] = []
    precision = policies.precision(tr, device)
    if tr.precision == "auto":
        notes.append("precision auto → " + ("bf16 (a GPU with bf16 support; fp32 on older GPUs)" if device == "cuda"
                                            else "fp32 (as training does on CPU)"))
    weights_dtype = policies.weights_dtype(recipe.model, QuantizationSpec(), precision, device)
    gc = policies.gradient_checkpointing(recipe)
    optim = policies.optimizer(tr.optim, device)
    if optim != tr.optim:
        notes.append(f"{tr.optim} needs CUDA; training uses {optim} on CPU")

    # Base weights. Quantized: bnb replaces every nn.Linear but the output head; the rest (embeddings,
    # norms, head) is cast to fp32 by prepare_model_for_kbit_training.
    if q.bits == 4:
        base = parts["linear_weights"] * NF4_BYTES[q.double_quant] + parts["other"] * 4
        act_dtype = policies.weights_dtype(recipe.model, q, precision, device)
        wlabel = f"{q.quant_type}{' + double quant' if q.double_quant else ''}"
        notes.append(f"4-bit {wlabel}: {NF4_BYTES[q.double_quant]:.4f} byte/param on the {parts['linear_weights']:,} "
                     f"linear weights; the other {parts['other']:,} params (embeddings, norms, head) in fp32 "
                     "after prepare_model_for_kbit_training")
    elif q.bits == 8:
        base = parts["linear_weights"] * 1 + parts["int8_rows"] * 4 + parts["other"] * 4
        act_dtype = policies.weights_dtype(recipe.model, q, precision, device)
        wlabel = "int8"
        notes.append("8-bit: 1 byte/param + an fp32 scale per row on linear weights; the rest in fp32")
    else:
        base = count.base_params * DTYPE_BYTES[weights_dtype]
        act_dtype = policies.PRECISION_DTYPE[precision] if precision != "fp32" else weights_dtype
        wlabel = weights_dtype
    saved_dtype_bytes = 4 if q.bits is not None else DTYPE_BYTES[weights_dtype]

    lora_bytes = (count.lora + count.dora) * 4  # peft keeps adapter weights in fp32 (autocast_adapter_dtype)
    saved_copy = count.modules_to_save * saved_dtype_bytes
    bias_bytes = count.bias * (4 if q.bits is not None else DTYPE_BYTES[weights_dtype])
    grads = lora_bytes + saved_copy + bias_bytes
    per_param = OPTIMIZER_BYTES[optim]
    if per_param is None:
        opt = parts["adafactor_floats"] * 4
        notes.append("adafactor: factored second moment (rows + columns per matrix), no first moment")
    else:
        opt = int(count.trainable * per_param)
    if q.bits is None and weights_dtype != "float32" and count.modules_to_save:
        notes.append(f"modules_to_save copies train in {weights_dtype} like the base weights")

    b, s = tr.batch_size, recipe.data.max_length
    act = trace_activations(config, recipe.model.task, recipe.lora, keys, batch=b, seq=s, dtype=act_dtype,
                            gradient_checkpointing=gc, num_labels=num_labels,
                            trust_remote_code=recipe.model.trust_remote_code, device=device)
    notes.append(f"activations: batch {b} × max_length {s} (every batch padded to max_length: an upper bound), "
                 f"{act_dtype}, gradient checkpointing {'on' if gc else 'off'}"
                 + ("" if act["method"] == "trace" else "; " + act["method"]))
    notes.append(f"grad_accum {tr.grad_accum} does not change memory; several GPUs each hold this plan (DDP)")
    components = OrderedDict(
        base_weights=int(base),
        lora_weights=int(lora_bytes + saved_copy),
        gradients=int(grads),
        optimizer_states=int(opt),
        activations=int(act["peak_bytes"]),
        runtime_overhead=RUNTIME_OVERHEAD[device],
    )
    return {
        "device": device,
        "precision": precision,
        "weights": wlabel,
        "optimizer": optim,
        "gradient_checkpointing": gc,
        "batch_size": b,
        "max_length": s,
        "components": components,
        "total_bytes": sum(components.values()),
        "activation_model": act,
        "assumptions": notes,
    }


# Beside weights and optimizer state a checkpoint holds the scheduler, RNG states, trainer_state.json and the
# tokenizer's files (Llama 3's tokenizer.json alone is ~9 MB): an upper allowance.
CHECKPOINT_EXTRA = 16 * MiB


def disk_plan(recipe: Recipe, mine: dict) -> dict:
    """Disk the run directory needs: adapter/ plus the checkpoints kept (each = the trainable weights + the
    optimizer state + small files); while a new checkpoint is written the oldest is still there."""
    comp, tr = mine["components"], recipe.training
    adapter = comp["gradients"]  # every trainable parameter, saved in its training dtype: as many bytes as its grads
    checkpoint = adapter + comp["optimizer_states"] + CHECKPOINT_EXTRA
    kept = tr.save_total_limit
    return {"adapter_bytes": int(adapter), "checkpoint_bytes": int(checkpoint), "checkpoints_kept": kept,
            "total_bytes": int(adapter + checkpoint * (kept + 1)),
            "checkpoint_every": {"steps": tr.save_steps, "minutes": tr.save_minutes},
            "assumption": f"adapter + {kept} checkpoints kept (training.save_total_limit) + 1 being written"}


def rule_of_thumb(recipe: Recipe, params: int) -> dict:
    """The rule of thumb's 7B numbers scaled to this model's size, for comparison (see docs/estimate.md)."""
    kind = "qlora" if recipe.quantization.bits == 4 else "lora"
    return {"kind": kind, "bytes": int(RULE_OF_THUMB_7B[kind] * params / 7e9),
            "source": "rule of thumb: a 7B model ≈ 16 GB with 16-bit LoRA, ≈ 6 GB with 4-bit QLoRA (batch 1, short "
                      "sequences, checkpointing), scaled by parameter count"}


# ----------------------------------------------------------------------------------------------
# Activations


def trace_activations(config, task: str, lora, keys: list[str], *, batch: int, seq: int, dtype: str,
                      gradient_checkpointing: bool, num_labels: int | None = None,
                      trust_remote_code: bool = False, device: str = "cpu") -> dict:
    """Bytes autograd keeps between forward and backward, from one forward pass on the meta device.

    peak = saved tensors + backward transient (the gradient of the largest saved tensor, usually the
    logits). With gradient checkpointing each layer keeps only its input; one layer's activations
    come back at a time during backward.
    """
    import copy

    import torch

    original = config
    layers, config = (None, config) if lora.layers_to_transform else _truncated(copy.deepcopy(config))
    try:
        model = _meta_peft_model(config, task, lora, keys, dtype=getattr(torch, dtype), num_labels=num_labels,
                                 trust_remote_code=trust_remote_code)
        saved, layer_inputs, largest = _trace(model, task, batch, seq, device)
    except Exception as e:  # an architecture whose forward needs real data: fall back to a formula
        return _formula(original, batch, seq, dtype, gradient_checkpointing,
                        f"meta trace failed ({type(e).__name__}); Korthikanti et al.'s formula, ±50 %")
    outside = saved.pop(None, 0)
    per_layer = list(saved.values())
    # Identical layers keep identical tensors: trace a few, repeat the last for the rest. (The first
    # keeps less: its input, the frozen embedding's output, needs no gradient.)
    extra = layers - len(per_layer) if layers and per_layer else 0
    inputs = list(layer_inputs.values())
    no_gc = outside + sum(per_layer) + extra * (per_layer[-1] if per_layer else 0)
    if gradient_checkpointing and per_layer:
        # Layers keep their inputs only; during backward one layer at a time is recomputed, after the
        # head's backward (the logits' transient) is over: the larger of the two sets the peak.
        kept = outside + sum(inputs) + extra * (inputs[-1] if inputs else 0)
        peak = kept + max(BACKWARD_TRANSIENT * largest, max(per_layer))
    else:
        kept = no_gc
        peak = kept + BACKWARD_TRANSIENT * largest
    return {
        "method": "trace",
        "saved_bytes": int(kept),
        "backward_transient_bytes": int(BACKWARD_TRANSIENT * largest),
        "peak_bytes": int(peak),
        "layers": len(per_layer) + extra,
        "traced_layers": len(per_layer),
        "per_layer_bytes": int(max(per_layer)) if per_layer else 0,
        "layer_input_bytes": int(max(layer_inputs.values())) if layer_inputs else 0,
        "outside_layers_bytes": int(outside),
        "bytes_per_token": round(peak / (batch * seq), 1),
        "without_checkpointing_bytes": int(no_gc + BACKWARD_TRANSIENT * largest),
    }


# Config keys that make layers differ from each other (MoE every k-th layer, dense first layers, ...).
_PER_LAYER_KEYS = ("layer_types", "mlp_only_layers", "first_k_dense_replace", "decoder_sparse_step",
                   "moe_layer_freq", "moe_layer_start_index", "sliding_window_pattern", "block_types",
                   "layers_block_type", "attn_layer_indices", "num_kv_shared_layers")
TRACED_LAYERS = 2
# Backward of the largest saved tensor (log-softmax of the logits, as a rule) holds its output's
# gradient and its input's gradient at once: two more tensors of that size. Measured on CPU.
BACKWARD_TRANSIENT = 2


def _truncated(config):
    """(real layer count, config to trace): decoder-only models with identical layers trace only
    TRACED_LAYERS of them (the rest scale); others are traced whole (count None)."""
    layers = getattr(config, "num_hidden_layers", None)
    sub = [k for k in ("text_config", "decoder") if hasattr(config, k)]
    if (not isinstance(layers, int) or layers <= TRACED_LAYERS or getattr(config, "is_encoder_decoder", False)
            or sub or any(getattr(config, k, None) not in (None, 0, 1) for k in _PER_LAYER_KEYS)):
        return None, config
    config.num_hidden_layers = TRACED_LAYERS
    return layers, config


def _formula(config, batch, seq, dtype, gc, method) -> dict:
    h = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or getattr(config, "n_embd", 1024)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 12
    vocab = getattr(config, "vocab_size", 32000)
    nbytes = DTYPE_BYTES.get(dtype, 4)
    per_layer = 17 * batch * seq * h * nbytes  # sbh·34 bytes at 16 bits, without the attention-score term
    logits = 2 * batch * seq * vocab * 4
    saved = (batch * seq * h * nbytes * layers + per_layer) if gc else per_layer * layers
    return {"method": method, "saved_bytes": int(saved + logits), "backward_transient_bytes": int(logits / 2),
            "peak_bytes": int(saved + 1.5 * logits), "layers": layers, "per_layer_bytes": int(per_layer),
            "layer_input_bytes": int(batch * seq * h * nbytes), "outside_layers_bytes": int(logits),
            "bytes_per_token": round((saved + 1.5 * logits) / (batch * seq), 1),
            "without_checkpointing_bytes": int(per_layer * layers + 1.5 * logits)}


def _meta_peft_model(config, task, lora, keys, *, dtype, num_labels, trust_remote_code):
    import copy

    from peft import get_peft_model

    model = T.build_meta_model(copy.deepcopy(config), task, trust_remote_code=trust_remote_code,
                               num_labels=num_labels)
    with _quiet():
        peft_model = get_peft_model(model, policies.lora_config(lora, task, keys, model=model))
    # Mixed precision runs the matmuls (and keeps their inputs) in the compute dtype.
    return peft_model.to(dtype).train()


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _trace(model, task: str, batch: int, seq: int, device: str):
    """(saved bytes per layer index, None = outside layers; layer input bytes; largest saved tensor)."""
    import torch

    layers = _layer_modules(model)
    current: list = [None]
    saved: dict = OrderedDict({None: 0})
    layer_inputs: dict = {}
    largest = [0]

    def pre(i):
        def hook(module, args, kwargs):
            current[0] = i
            saved.setdefault(i, 0)
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor):
                layer_inputs[i] = x.numel() * x.element_size()
        return hook

    def post(module, args, output):
        current[0] = None

    # Frozen weights are saved too (a linear layer needs W for its input's gradient), but they
    # exist anyway: the plan counts them as base weights.
    seen: set = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen:
            seen.add(key)
            nbytes = storage.nbytes()
            saved[current[0]] = saved.get(current[0], 0) + nbytes
            largest[0] = max(largest[0], nbytes)
        return t

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
    try:
        with torch.device("meta"):
            ids = torch.zeros(batch, seq, dtype=torch.long)
            labels = torch.zeros(batch, dtype=torch.long) if tasks.task(task).row_label else ids
        with _flash_like_sdpa(device), _quiet(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=labels)
    finally:
        for h in handles:
            h.remove()
    return saved, layer_inputs, largest[0]


def _layer_modules(model) -> list:
    """The repeated blocks: children of the outermost ModuleLists (encoder and decoder stacks alike)."""
    import torch.nn as nn

    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and ".lora_" not in name \
                and not any(name.startswith(p + ".") for p, _ in found):
            if any(p.startswith(name + ".") for p, _ in found):
                continue
            found.append((name, module))
    return [child for _, ml in found for child in ml]


@contextlib.contextmanager
def _flash_like_sdpa(device: str):
    """On meta, SDPA falls back to the math kernel, which keeps the s×s attention matrix. Training on
    CPU or GPU uses a fused kernel that keeps q, k, v, the output and a log-sum-exp row only, except
    on CPU with attention dropout (GPT-2's attn_pdrop), where the math kernel runs there too."""
    import torch
    import torch.nn.functional as F

    class FusedSDPA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # never called: the trace runs forward only
            raise NotImplementedError

    original = F.scaled_dot_product_attention

    def fake(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
        if dropout_p > 0 and device == "cpu":
            return original(query, key, value, attn_mask, dropout_p, *args, **kwargs)
        return FusedSDPA.apply(query, key, value)

    F.scaled_dot_product_attention = fake
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ----------------------------------------------------------------------------------------------
# This machine


def device_memory() -> tuple[str, int]:
    """('cuda', total memory of GPU 0) when CUDA is available, else ('cpu', system RAM)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", int(torch.cuda.get_device_properties(0).total_memory)
    import os

    # psutil is a test dependency only: the OS answers this itself.
    return "cpu", int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
