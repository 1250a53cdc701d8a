"""`lorafit generate`: greedy generation from base + adapter (or a plain model), the prompt rendered as
training rendered it (core.prompts) and the model loaded as training loaded it (core.models)."""

from __future__ import annotations

from pathlib import Path

from lorafit import log
from lorafit.core import models, policies
from lorafit.core.adapters import find_adapter, holds_adapter
from lorafit.core.prompts import encode, end_of_turn_ids, inference_prompt
from lorafit.errors import ModelError
from lorafit.recipe import ModelSpec, QuantizationSpec, TrainingSpec


def load_for_inference(model_or_adapter: str | Path):
    """(model, tokenizer, recipe or None) ready for generation; base + adapter when given an adapter or run."""
    if holds_adapter(model_or_adapter):
        source = find_adapter(model_or_adapter)
        model, tokenizer = models.load_adapted(source)
        return model, tokenizer, source.run_recipe()
    spec = ModelSpec(name=str(model_or_adapter))
    path = models.local_path(spec.name, where=str(model_or_adapter))
    if path is not None and path.is_file() and models.is_gguf_name(spec.name):
        spec = models.materialize_gguf(spec)  # a .gguf file: its cached plain conversion
    elif path is not None and not (path / "config.json").is_file():
        raise ModelError("neither a model, an adapter nor a run directory", where=str(model_or_adapter),
                         fix="pass a run dir, an adapter dir, a local model dir, a .gguf file or a cached hub id")
    tokenizer = models.load_tokenizer(spec)
    dtype = policies.weights_dtype(spec, QuantizationSpec(), policies.precision(TrainingSpec()))
    model = models.load_model(spec, None, dtype, pad_token_id=tokenizer.pad_token_id)
    return model.eval(), tokenizer, None


def complete(model, tokenizer, recipe, prompt: str, max_new_tokens: int = 64) -> str:
    import torch

    spec = recipe.data if recipe else None
    chat = spec.format == "chat" if spec else bool(getattr(tokenizer, "chat_template", None))
    ids = encode(inference_prompt(prompt, tokenizer, spec), tokenizer, chat=chat)
    input_ids = torch.tensor([ids], device=model.device)
    # Stop at EOS, and for chat also at the token that closes an assistant turn in the template trained on.
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stop += [i for i in (end_of_turn_ids(tokenizer, spec) if chat else []) if i not in stop]
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop or None,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


def generate(model_or_adapter: str | Path, prompt: str, *, max_new_tokens: int = 64) -> str:
    log.quiet_libraries()
    model, tokenizer, recipe = load_for_inference(model_or_adapter)
    return complete(model, tokenizer, recipe, prompt, max_new_tokens)
