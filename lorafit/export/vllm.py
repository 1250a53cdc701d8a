"""`lorafit export --to vllm`: the adapter checked against the rules vLLM loads LoRA adapters by, before a GPU
meets it, then written clean with the exact `vllm serve` line.

vLLM refuses, at load time: modules_to_save (a head or embeddings trained in full), DoRA, a bias, a rank above
--max-lora-rank, a LoRA module whose name its model does not adapt (vllm.lora: only its linear layers, by their
last name, packed ones such as qkv_proj under their parts' names), and a model class without LoRA support.
It also loads, without a word, a chat template that is the base's rather than the one the adapter was
trained with, and scales every module by one lora_alpha / r (rank_pattern / alpha_pattern are not read).
Everything here is read from adapter_config.json, the safetensors header and the base's config.json and
tokenizer: no weight is loaded.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from lorafit import log
from lorafit.core import models, tasks
from lorafit.core.adapters import AdapterSource
from lorafit.core.gguf import gguf_source, gguf_spec, is_gguf_cache
from lorafit.core.hub import local_path
from lorafit.core.weights import adapter_ranks, adapter_weights, is_lora_key, read_header
from lorafit.errors import ModelError

# vLLM's --max-lora-rank takes these values only (vllm.config.lora.LoRAConfig.max_lora_rank).
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Model classes whose vLLM implementation takes LoRA (SupportsLoRA) → the module names it adapts, as the
# Hugging Face checkpoint (and so the adapter) names them: vLLM's packed layers under their parts' names
# (qkv_proj ← q/k/v_proj, gate_up_proj ← gate/up_proj), Phi-3's already fused ones as they are.
_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_MODULES = {
    **{arch: _LLAMA_STYLE for arch in (
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM", "InternLM3ForCausalLM")},
    "Phi3ForCausalLM": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
# Model classes vLLM serves without LoRA support: an adapter on them is refused (merge it instead).
NO_LORA = ("GPT2LMHeadModel", "GPTNeoXForCausalLM", "FalconForCausalLM", "GPTJForCausalLM", "BloomForCausalLM",
           "GPTBigCodeForCausalLM")
_MERGE_FIX = "merge it into its base (`lorafit merge ADAPTER --output DIR`) and serve the merged model with `vllm serve DIR`"
ADAPTER_DIR = "adapter"
TEMPLATE_FILE = "chat_template.jinja"


def max_lora_rank(r: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds rank *r*; None above its largest."""
    return next((m for m in MAX_LORA_RANKS if m >= r), None)


def check(source: AdapterSource) -> dict:
    """Every vLLM rule that needs no weights; ModelError with the fix at the first one broken. Returns what
    was found: {r, max_lora_rank, modules (leaf names adapted), architecture (or None when unknown)}."""
    cfg, where = source.config, str(source.adapter_dir / "adapter_config.json")
    if not source.task.causal:
        raise ModelError(f"a {source.task.name} adapter: vLLM serves LoRA adapters of text-generating (causal_lm) "
                         "models only", where=where, fix="serve it with `lorafit serve`, or train a causal_lm adapter")
    if cfg.get("modules_to_save"):
        raise ModelError(f"the adapter trains {', '.join(cfg['modules_to_save'])} in full (modules_to_save), which "
                         "vLLM refuses", where=where, fix=_MERGE_FIX)
    if cfg.get("use_dora"):
        raise ModelError("a DoRA adapter (use_dora): vLLM does not load DoRA's magnitude vectors", where=where,
                         fix=_MERGE_FIX)
    if (cfg.get("bias") or "none") != "none":
        raise ModelError(f"the adapter trains biases (bias: {cfg['bias']}); vLLM loads LoRA factors only",
                         where=where, fix=f"{_MERGE_FIX}; or train with lora.bias: none")
    if cfg.get("lora_bias"):
        raise ModelError("the adapter has a bias on its lora_B factors (lora_bias); vLLM loads no LoRA bias",
                         where=where, fix=_MERGE_FIX)
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ModelError("the adapter gives some modules their own rank or alpha (rank_pattern / alpha_pattern); vLLM "
                         "scales every module by one lora_alpha / r, so those modules would be scaled wrongly",
                         where=where, fix=_MERGE_FIX)
    ranks, other = module_ranks(source)
    leaves = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    architecture = base_architecture(source)
    if architecture in NO_LORA:
        raise ModelError(f"vLLM serves {architecture} without LoRA support", where=f"base model {source.base}",
                         fix=_MERGE_FIX)
    if architecture in LORA_MODULES:
        allowed = LORA_MODULES[architecture]
        refused = [leaf for leaf in leaves if leaf not in allowed]
        if refused:
            raise ModelError(f"LoRA on {', '.join(refused)}: vLLM's {architecture} adapts only {', '.join(allowed)}",
                             where=where, fix=f"train with lora.target_modules within {', '.join(allowed)}; or "
                                              f"{_MERGE_FIX}")
    elif architecture is not None:
        log.warn(f"export: lorafit does not know which modules vLLM adapts in {architecture}; the target modules "
                 f"({', '.join(leaves)}) are not checked")
    if other:
        raise ModelError(f"the adapter holds {len(other)} tensor(s) that are no LoRA factor (e.g. {other[0]}); vLLM "
                         "loads lora_A / lora_B only", where=str(source.adapter_dir / "adapter_model.safetensors"),
                         fix=_MERGE_FIX)
    r = max([int(cfg.get("r") or 0), *ranks.values()])
    needed = max_lora_rank(r)
    if needed is None:
        raise ModelError(f"rank {r} is above vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]})", where=where,
                         fix=_MERGE_FIX)
    return {"r": r, "max_lora_rank": needed, "modules": leaves, "architecture": architecture}


def module_ranks(source: AdapterSource) -> tuple[dict[str, int], list[str]]:
    """({module path: rank}, the tensors that are no LoRA's) from the safetensors header (core.weights).
    ModelError without LoRA weights."""
    ranks = adapter_ranks(source.adapter_dir)
    other = [k for k in read_header(adapter_weights(source.adapter_dir)) if not is_lora_key(k)]
    return ranks, other


def base_architecture(source: AdapterSource) -> str | None:
    """The base's model class (config.json's architectures[0]); None, said on stderr, when its config is not
    on this machine (a hub id never downloaded)."""
    try:
        spec = models.base_spec(source)[0]
        path = local_path(spec.name, where=f"base model {spec.name}")
        if path is not None:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            return (config.get("architectures") or [None])[0]
        from lorafit.core.targets import load_config

        return (getattr(load_config(spec.name, revision=spec.revision, where="base model"), "architectures", None)
                or [None])[0]
    except (ModelError, OSError, ValueError) as e:
        log.warn(f"export: cannot read the base model's config ({e}); its architecture is not checked")
        return None


# ----------------------------------------------------------------------------------------------
# Writing


def export(source: AdapterSource, work: Path, final: Path, found: dict, *, name: str) -> dict:
    """Write the vLLM export of *source*, *found* by check (before anything was written), into *work* (renamed
    to *final* by the caller). Returns the report."""
    base = served_base(source)
    adapter_out = work / ADAPTER_DIR
    adapter_out.mkdir(parents=True)
    config = clean_config(source.config, found["modules"], base)
    (adapter_out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.copy2(source.adapter_dir / "adapter_model.safetensors", adapter_out / "adapter_model.safetensors")

    tokenizer, base_tokenizer = _tokenizers(source)
    notes: list[str] = []
    vocab_changed = base_tokenizer is not None and tokenizer.get_vocab() != base_tokenizer.get_vocab()
    if vocab_changed:
        tokenizer.save_pretrained(str(adapter_out))
    template = getattr(tokenizer, "chat_template", None)
    base_template = getattr(base_tokenizer, "chat_template", None) if base_tokenizer is not None else None
    template_file = None
    if isinstance(template, str) and template != base_template:
        (work / TEMPLATE_FILE).write_text(template, encoding="utf-8")
        template_file = final / TEMPLATE_FILE
        if base_tokenizer is None:
            notes.append("the base's tokenizer is not on this machine to compare with: the chat template the adapter "
                         "was trained with is passed explicitly")
    recipe = source.recipe_or_none()
    if recipe is not None and recipe.data.format != "chat":
        notes.append(f"trained on data.format {recipe.data.format}, not chat: ask through /v1/completions with the "
                     "prompt written as in training (see `prompt_example`), not /v1/chat/completions")
    notes += _base_notes(source, recipe, base)

    path = final / ADAPTER_DIR
    command = ["vllm", "serve", base, "--enable-lora", "--max-lora-rank", str(found["max_lora_rank"]),
               "--lora-modules", f"{name}={path}"]
    if template_file is not None:
        command += ["--chat-template", str(template_file)]
    modules_json = json.dumps({"name": name, "path": str(path), "base_model_name": base})
    report = {"to": "vllm", "adapter": str(source.adapter_dir), "output": str(final), "name": name, "base": base,
              "architecture": found["architecture"], "r": found["r"], "max_lora_rank": found["max_lora_rank"],
              "target_modules": found["modules"], "chat_template": str(template_file) if template_file else None,
              "tokenizer_copied": vocab_changed, "prompt_format": recipe.data.format if recipe else None,
              "prompt_example": _prompt_example(tokenizer, recipe),
              "stop_token_ids": _stop_ids(tokenizer, recipe),
              "command": shlex.join(command),
              "lora_modules_json": "--lora-modules " + shlex.quote(modules_json),
              "request_model": name, "notes": notes}
    (work / "lorafit-export.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["files"] = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    return report


def clean_config(config: dict, modules: list[str], base: str) -> dict:
    """adapter_config.json as vLLM reads it (vllm.lora.peft_helper.PEFTHelper), still a valid peft config:
    the modules actually adapted, as a list (a string is read as a regular expression), nothing vLLM refuses."""
    return {"peft_type": "LORA", "task_type": tasks.from_peft_type(config.get("task_type")).peft_task_type, "base_model_name_or_path": base,
            "r": int(config["r"]), "lora_alpha": config.get("lora_alpha", 8), "target_modules": list(modules),
            "bias": "none", "modules_to_save": None, "use_rslora": bool(config.get("use_rslora")),
            "use_dora": False, "lora_dropout": 0.0, "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
            "inference_mode": True}


def served_base(source: AdapterSource) -> str:
    """What vLLM loads as the base: its hub id when one is known (a GGUF base's too: vLLM serves the original
    weights), else the local directory the adapter was trained on."""
    hub = models.adapter_hub_base(source)
    if hub:
        return hub
    spec = models.base_spec(source)[0]
    path = local_path(spec.name, where=f"base model {spec.name}")
    return str(path.resolve()) if path is not None else spec.name


def _tokenizers(source: AdapterSource):
    """(the adapter's tokenizer, the base's or None when it is not on this machine)."""
    tokenizer = models.load_adapter_tokenizer(source)
    try:
        base = models.load_tokenizer(models.base_spec(source)[0])
    except (ModelError, OSError, ValueError):
        base = None
    return tokenizer, base


def _base_notes(source: AdapterSource, recipe, base: str) -> list[str]:
    notes = []
    model = recipe.model if recipe is not None else None
    recorded = source.config.get("base_model_name_or_path")
    gguf = None
    if model is not None:
        try:
            gguf = gguf_spec(model).gguf_file
        except ModelError:
            gguf = None
    if gguf or is_gguf_cache(recorded):
        what = gguf or gguf_source(recorded).get("gguf_file") or "a GGUF file"
        notes.append(f"the adapter was trained on {Path(what).name} dequantized; vLLM serves the original weights "
                     f"of {base}, so answers may differ slightly from `lorafit generate`")
    if recipe is not None and recipe.quantization.bits:
        notes.append(f"trained on a {recipe.quantization.bits}-bit (QLoRA) base: add `--quantization bitsandbytes` "
                     "to serve the base as it was trained, or serve it in 16-bit (answers may differ slightly)")
    return notes


def _prompt_example(tokenizer, recipe) -> str | None:
    from lorafit.core.generation import render_prompt

    try:
        return render_prompt("PROMPT", tokenizer, recipe.data if recipe else None)
    except Exception:  # a template that fails on a bare user turn: nothing to show
        return None


def _stop_ids(tokenizer, recipe) -> list[int]:
    from lorafit.core.generation import stop_ids

    return stop_ids(tokenizer, recipe.data if recipe else None)
