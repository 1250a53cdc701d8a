"""`lorafit generate`: greedy generation from base + adapter, formatting the prompt as training did."""

from __future__ import annotations

from pathlib import Path

from lorafit.errors import ModelError


def find_source(path: str | Path):
    """The AdapterSource when *path* is an adapter or run directory; None for a plain model."""
    from lorafit.adapters import find_adapter, holds_adapter

    return find_adapter(path) if holds_adapter(path) else None


def run_recipe(source):
    """The resolved recipe of the run that made this adapter, when it sits in a run directory."""
    from lorafit.recipe import load_recipe

    if source is None or source.run_dir is None or not (source.run_dir / "recipe.yaml").is_file():
        return None
    return load_recipe(source.run_dir / "recipe.yaml")


def format_prompt(prompt: str, tokenizer, recipe) -> tuple[str, bool]:
    """(text, add_special_tokens): training and inference must see the same template.

    A chat template renders BOS itself; other formats get the tokenizer's own special tokens, as in training.
    """
    fmt = recipe.data.format if recipe else ("chat" if getattr(tokenizer, "chat_template", None) else "text")
    if fmt == "alpaca":
        return recipe.data.prompt_template_no_input.format(instruction=prompt), True
    if fmt == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True), False
    return prompt, True


def load_for_inference(model_or_adapter: str | Path, *, dtype=None):
    """(model, tokenizer, recipe) ready for generation; base + adapter when given an adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = find_source(model_or_adapter)
    recipe = run_recipe(source)
    adapter = source.adapter_dir if source else None
    base = source.base if source else str(model_or_adapter)
    if source is None and not Path(base).is_dir() and base.startswith((".", "/")):
        raise ModelError("directory not found", where=base,
                         fix="pass a run dir, an adapter dir, a local model dir or a cached hub id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(adapter or base))
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32)
    except OSError as e:
        raise ModelError(f"cannot load '{base}': {str(e).splitlines()[0]}", where=str(model_or_adapter),
                         fix="pass a run dir, an adapter dir or a local model dir") from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tokenizer, recipe


def complete(model, tokenizer, recipe, prompt: str, max_new_tokens: int = 64) -> str:
    import torch

    text, add_special = format_prompt(prompt, tokenizer, recipe)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=add_special)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def generate(model_or_adapter: str | Path, prompt: str, *, max_new_tokens: int = 64) -> str:
    from lorafit.log import quiet_libraries

    quiet_libraries()
    model, tokenizer, recipe = load_for_inference(model_or_adapter)
    return complete(model, tokenizer, recipe, prompt, max_new_tokens)
