"""Which modules of a model can take LoRA, how presets resolve, and how many parameters that adds.

The same code answers ``find-targets``, ``estimate``, ``validate`` and training: a model is read
from its config on the meta device (no weights), its modules are classified by their path, and
presets are resolved from what is really there, never from a table alone.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from lorafit.core import tasks
from lorafit.core.gguf import gguf_metadata_memo, gguf_spec, is_gguf_name
from lorafit.core.hub import local_path
from lorafit.core.policies import lora_config
from lorafit.core.weights import count_adapted
from lorafit.errors import ModelError, RecipeError
from lorafit.recipe import LoraSpec, ModelSpec

PRESETS = ("attention", "mlp", "all-linear")

# Path components that put a module in the attention or MLP block, across families.
_ATTENTION = re.compile(r"(^|_)(attn|attention|self_attention|self_attn|cross_attn|encdecattention|selfattention)($|_)")
_MLP = re.compile(r"(^|_)(mlp|ffn|feed_forward|feedforward|intermediate|densereludense|block_sparse_moe|experts|moe)($|_)")
# Leaf names known to be fused projections (several matrices in one Linear).
FUSED = {"c_attn", "query_key_value", "qkv_proj", "gate_up_proj", "Wqkv", "qkv", "in_proj", "W_pack"}
# BERT-style encoders put the FFN's second matrix at layer.N.output.dense.
_ENCODER_FFN_PARENT = {"intermediate", "output"}


@dataclass(frozen=True)
class LinearModule:
    """One adaptable matrix: full dotted path, block, shape."""

    name: str
    block: str  # attention | mlp | other
    in_features: int
    out_features: int

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def fused(self) -> bool:
        return self.leaf in FUSED

    def lora_params(self, r: int) -> int:
        return r * (self.in_features + self.out_features)


def _is_linear(module) -> tuple[int, int] | None:
    """(in, out) for nn.Linear (incl. bitsandbytes subclasses) and transformers' Conv1D, else None."""
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2: weight is (in, out)
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    return None


def classify(name: str) -> str:
    parts = name.split(".")
    for p in parts[:-1]:
        if _ATTENTION.search(p.lower()):
            return "attention"
    for p in parts[:-1]:
        if _MLP.search(p.lower()):
            return "mlp"
    if len(parts) >= 2 and parts[-2] in _ENCODER_FFN_PARENT:
        return "mlp"
    leaf = parts[-1].lower()
    if leaf in {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "c_attn", "qkv_proj",
                "query_key_value", "out_proj", "wqkv", "wo_attn"}:
        return "attention"
    if leaf in {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "wi", "wo",
                "wi_0", "wi_1", "dense_h_to_4h", "dense_4h_to_h", "gate_up_proj"}:
        return "mlp"
    return "other"


def output_head_names(model) -> set[str]:
    """Full paths of output heads (lm_head, classifier, score, ...): never adapted by a preset."""
    heads: set[str] = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if out_emb is not None and module is out_emb:
            heads.add(name)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in {"lm_head", "classifier", "score", "qa_outputs", "embed_out", "output_layer"} or \
                name.startswith(("classifier.", "score.", "lm_head.")):
            if _is_linear(module) is not None:
                heads.add(name)
    return heads


def linear_modules(model) -> list[LinearModule]:
    """Every adaptable matrix of *model* but its output heads, in module order."""
    heads = output_head_names(model)
    found = []
    for name, module in model.named_modules():
        if name in heads or not name:
            continue
        # LoRA-wrapped layers expose base_layer; count the original only.
        if ".lora_" in name or name.endswith(".base_layer") or "modules_to_save" in name or "original_module" in name:
            continue
        shape = _is_linear(module)
        if shape is not None:
            found.append(LinearModule(name, classify(name), shape[0], shape[1]))
    return found


def select(modules: list[LinearModule], preset: str) -> list[LinearModule]:
    if preset == "all-linear":
        return [m for m in modules if m.block in ("attention", "mlp", "other")]
    return [m for m in modules if m.block == preset]


def matches(name: str, key: str) -> bool:
    """peft's rule: a target key matches a module path equal to it or ending in '.key'."""
    return name == key or name.endswith("." + key)


def minimal_keys(chosen: list[LinearModule], all_modules: list[LinearModule]) -> list[str]:
    """Shortest path suffixes that match exactly the chosen modules (q_proj, not model.layers.0.self_attn.q_proj)."""
    chosen_names = {m.name for m in chosen}
    keys: list[str] = []
    for m in chosen:
        if any(matches(m.name, k) for k in keys):
            continue
        parts = m.name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            key = ".".join(parts[i:])
            hits = {a.name for a in all_modules if matches(a.name, key)}
            if hits <= chosen_names:
                keys.append(key)
                break
    return keys


def resolve_targets(model, target_modules, *, model_name: str = "model") -> tuple[list[str], list[LinearModule]]:
    """Recipe's lora.target_modules → (keys for peft, the modules they select). Raises RecipeError."""
    modules = linear_modules(model)
    if not modules:
        raise ModelError(f"{model_name} has no nn.Linear or Conv1D module LoRA could adapt", where="model.name")
    if isinstance(target_modules, str):
        chosen = select(modules, target_modules)
        if not chosen:
            blocks = sorted({m.block for m in modules})
            raise RecipeError(f"preset '{target_modules}' selects no module of {model_name}",
                              where="lora.target_modules",
                              fix=f"its modules fall in: {', '.join(blocks)}; list names instead: {', '.join(leaf_names(modules))}")
        return minimal_keys(chosen, modules), chosen
    chosen_names: set[str] = set()
    for key in target_modules:
        hits = [m for m in modules if matches(m.name, key)]
        if not hits:
            raise RecipeError(f"'{key}' matches no module of {model_name}", where="lora.target_modules",
                              fix=f"modules that can take LoRA: {', '.join(leaf_names(modules))} "
                                  f"(or a preset: {', '.join(PRESETS)}; see `lorafit find-targets`)")
        chosen_names.update(m.name for m in hits)
    return list(target_modules), [m for m in modules if m.name in chosen_names]


def layout(model, chosen: list[LinearModule]) -> dict:
    """What the advice (core/advice.py) asks of a model's modules: the blocks LoRA adapts and those the model has,
    and its input and output embeddings (paths; the input's rows). Works on the meta model."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    return {"targeted_blocks": sorted({m.block for m in chosen}),
            "model_blocks": sorted({m.block for m in linear_modules(model)}),
            "embedding": names.get(id(emb)) if emb is not None else None,
            "embedding_rows": getattr(emb, "num_embeddings", None),
            "output_embedding": names.get(id(out)) if out is not None else None}


def leaf_names(modules: list[LinearModule]) -> list[str]:
    seen: dict[str, None] = {}
    for m in modules:
        seen.setdefault(m.leaf, None)
    return list(seen)


def count_lora_params(chosen: list[LinearModule], r: int, layers_to_transform: list[int] | None = None,
                      use_dora: bool = False) -> int:
    """A and B (and DoRA magnitudes) of *chosen*, from their shapes: find-targets' per-module figures."""
    total = 0
    for m in chosen:
        if layers_to_transform is not None and layer_index(m.name) not in layers_to_transform:
            continue
        total += m.lora_params(r) + (m.out_features if use_dora else 0)
    return total


def layer_index(name: str) -> int | None:
    """peft's rule for layers_to_transform: the first number that follows a named segment (layers.3.)."""
    found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class TrainableCount:
    """What get_peft_model makes trainable, by kind; ``all_params`` is peft's denominator."""

    lora: int             # A and B matrices
    dora: int             # DoRA magnitude vectors (out_features per adapted module)
    bias: int             # biases made trainable by lora.bias
    modules_to_save: int  # full copies of modules_to_save (and the seq_cls / token_cls head)
    base_params: int      # the base model, tied weights once
    adapted_modules: int  # matrices that get an A and a B
    all_params: int       # peft's get_nb_trainable_parameters() total
    saved_modules: tuple[str, ...] = ()

    @property
    def trainable(self) -> int:
        return self.lora + self.dora + self.bias + self.modules_to_save

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.all_params, 1)


def count_params(model) -> int:
    """Parameters of *model*, tied weights counted once (as peft and transformers count them)."""
    return sum(p.numel() for p in model.parameters())


def count_trainable(model, chosen: list[LinearModule], *, r: int, bias: str = "none", use_dora: bool = False,
                    layers_to_transform: list[int] | None = None, modules_to_save: list[str] | None = None,
                    task: str = tasks.DEFAULT, lora: LoraSpec | None = None) -> TrainableCount:
    """Exact trainable parameters of LoRA on *chosen* (from resolve_targets) over a meta *model*: peft
    itself wraps a copy on the meta device (no memory) and its trainable parameters are sorted by kind.
    *lora* (the recipe's section) wins over the keyword arguments."""
    import copy

    import torch
    from peft import get_peft_model
    from peft.utils.other import ModulesToSaveWrapper

    if lora is None:
        lora = LoraSpec(r=r, bias=bias, use_dora=use_dora, layers_to_transform=layers_to_transform,
                        modules_to_save=modules_to_save, dropout=0.0)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Suffix keys, as training passes them: peft applies layers_to_transform to those, not to full paths.
        keys = minimal_keys(chosen, linear_modules(model))
        peft_model = get_peft_model(copy.deepcopy(model), lora_config(lora, task, keys, model=model))
    parts = {"lora": 0, "dora": 0, "bias": 0, "modules_to_save": 0}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        kind = ("modules_to_save" if ".modules_to_save." in name else "dora" if "lora_magnitude_vector" in name
                else "lora" if ".lora_" in name else "bias")
        parts[kind] += p.numel()
    _, all_params = peft_model.get_nb_trainable_parameters()
    adapted = count_adapted(peft_model)
    prefix = "base_model.model."
    saved = tuple(n.removeprefix(prefix) for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper))
    return TrainableCount(parts["lora"], parts["dora"], parts["bias"], parts["modules_to_save"], count_params(model),
                          adapted, int(all_params), saved)


# ----------------------------------------------------------------------------------------------
# Building a model without its weights


def load_config(name: str, *, revision: str | None = None, trust_remote_code: bool = False, gguf_file: str | None = None,
                where: str = "model.name", config_only: bool = False):
    """AutoConfig for a hub id (cached) or a local dir; ModelError naming what was looked for.

    *where* names the input in errors: the recipe's model.name, or find-targets' MODEL argument. *config_only*:
    the caller reads nothing else (find-targets, estimate), and a missing model's fix says so."""
    from transformers import AutoConfig

    if gguf_file is None and is_gguf_name(name):  # a .gguf file: its folder + its name
        try:
            spec = gguf_spec(ModelSpec(name=name))
        except ModelError as e:
            raise ModelError(e.message, where=where, fix=e.fix) from None
        name, gguf_file = spec.name, spec.gguf_file
    path = local_path(name, where=where)
    if path is not None and not path.is_dir():
        raise ModelError(f"'{name}' is a file, not a model directory", where=where,
                         fix="pass the directory that holds config.json")
    if path is not None and not (path / "config.json").is_file() and gguf_file is None:
        raise ModelError(f"'{name}' has no config.json", where=where,
                         fix="pass a Hugging Face model directory (config.json + weights + tokenizer)")
    try:
        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        with gguf_metadata_memo():  # a GGUF's config is its metadata: no tensor is read
            return AutoConfig.from_pretrained(str(path) if path is not None else name, **kwargs)
    except ValueError as e:  # unknown model_type, remote code refused, ...
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise ModelError(f"'{name}' needs its own Python code (auto_map in config.json) to load, and "
                             "model.trust_remote_code is off", where="model.trust_remote_code" if where == "model.name"
                             else where,
                             fix="read that code first; then set model.trust_remote_code: true (and pin model.revision "
                                 "to a commit), or use a model transformers supports natively") from None
        raise ModelError(str(e).splitlines()[0], where=where,
                         fix="upgrade transformers, or set model.trust_remote_code: true if you trust the checkpoint")
    except OSError as e:
        if path is not None and (path / "config.json").is_file():  # there, but not a config transformers reads
            raise ModelError(f"{path / 'config.json'} cannot be read: {str(e).strip().splitlines()[0][:200]}",
                             where=where, fix="restore it from the model's source (it must be valid JSON)") from None
        from huggingface_hub import constants

        from lorafit.core.hub import hub_unreachable

        away = hub_unreachable()
        fix = ("download it on a machine that reaches the hub (hf download NAME) and copy it into this cache, or pass "
               "a local directory" if away else "download it first (hf download NAME) or pass a local directory")
        if config_only:
            fix += " (a folder holding only its config.json is enough here: nothing else is read)"
        raise ModelError(f"'{name}' is neither a local model directory nor a model in the hub cache "
                         f"({constants.HF_HUB_CACHE})" + (f", and the hub ({away}) cannot be reached from this "
                                                          "machine" if away else ""),
                         where=where, fix=fix) from None


def build_meta_model(config, task: str = tasks.DEFAULT, *, trust_remote_code: bool = False, num_labels: int | None = None):
    """The model's modules on the meta device: exact shapes, no memory, no weights read."""
    import torch

    if num_labels is not None:
        config.num_labels = num_labels
    with torch.device("meta"):
        try:
            model = tasks.auto_model_class(task).from_config(config, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise ModelError(f"{config.model_type} has no {task} head: {str(e).splitlines()[0]}",
                             where="model.task") from None
    # Building on meta can leave tied embeddings untied; tie them so totals are right.
    model.tie_weights()
    return model
