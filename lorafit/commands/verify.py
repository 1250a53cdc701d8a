"""`lorafit merge --verify`: prove the merged model computes what base + adapter computes.

Logits and perplexity of both on a few prompts (the run's data when known, else built-in text); the perplexity is
over the trained tokens, the run's rows tokenized as training tokenized them, as training's loss is (every token
of built-in text, which has no labels). Models
loaded one at a time so RAM stays near one copy of the base; the base alone (adapter disabled) too, so the
merge error is measured against the adapter's own effect; for a QLoRA-trained adapter, also the gap
between the 16-bit merge and the quantized model the adapter was trained on.
"""

from __future__ import annotations

import math
from pathlib import Path

from lorafit import log
from lorafit.core.adapters import AdapterSource
from lorafit.core.models import load_adapted
from lorafit.core.prompts import encode, row_text, seq2seq_pair, seq2seq_tokens
from lorafit.errors import LorafitError
from lorafit.stages.data.read import SUFFIXES, read_rows

# Max |logit difference| merged vs base+adapter allowed, relative to the largest |logit| (at least 1).
# fp32 merges are exact up to rounding, which grows with the adapter: (W + ΔW)·x against W·x + ΔW·x measured
# ~2e-6 of the largest logit on the tiny Llama, 2.1e-5 on the tiny T5 with an adapter that moves logits by 25
# (1e-4 keeps a 5x margin; a dropped adapter is caught by MAX_EFFECT_RATIO below). 16-bit merges round W + ΔW
# where base+adapter rounds W·x and ΔW·x apart: on the tiny test model that alone moves bf16 logits by ~6 % of
# the largest (fp16: ~0.4 %).
TOLERANCE = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 1.5e-1}
PPL_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}  # relative perplexity difference
BUILTIN_PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time, a small model learned to answer questions about the weather and colours.",
]
MAX_PROMPTS, MAX_PROMPT_TOKENS = 4, 64
MAX_ROW_TOKENS = 256  # the run's rows, as training cut them (data.max_length), at most this long
ALL_TOKENS = "tokens (every token of the text: no labels to follow)"
# The adapter's effect must survive the merge: max |logit diff| merged vs base+adapter (the merge error) must
# stay below this fraction of max |logit diff| base+adapter vs base (the adapter's effect). A merge that
# dropped the adapter scores exactly 1.0 (merged == base). Measured on the tiny test models with the test
# adapters (lora_B ~ N(0, 0.2), effect ~8.6 logits): fp32 ~2e-6, fp16 0.003-0.004, bf16 0.03-0.05, a
# 10x margin. The bf16 merge error has a floor of ~0.12-0.34 logits there whatever the adapter, so weaker
# adapters come closer: effect ~0.9 → 0.38, effect ~0.45 → 0.58 and effect ~0.25 → 0.91 (bf16 rounds
# most of such a ΔW away when adding it to W: the merged model really has lost much of the adapter; a
# float32 merge keeps it, ratio ~1e-5). TOLERANCE alone (15 % of the largest logit in bf16) passes a
# dropped adapter whose effect is below that, ~1 logit on the tiny models.
MAX_EFFECT_RATIO = 0.5


def verify_merged(merged_dir: str | Path, source: AdapterSource, *, dtype: str) -> dict:
    """Logits and perplexity of the merged model vs base+adapter (and vs the quantized model for QLoRA).

    Models are loaded one at a time, so RAM stays at about one copy of the base.
    """
    import gc

    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(merged_dir))
    causal = source.task.generates  # a perplexity to compare: the next tokens' loss
    found = trained_rows(source, tokenizer) if causal else None
    if found is not None:  # the run's rows with their labels: perplexity over what training computed its loss on
        batch, prompt_source, scored_on = found
        prompts = batch
    else:
        prompts, prompt_source, chat = eval_prompts(source, tokenizer)
        batch = _inputs(prompts, tokenizer, chat=chat, seq2seq=source.task.encoder_decoder)
        scored_on = "tokens of the target (all of it)" if source.task.encoder_decoder else ALL_TOKENS

    log.info(f"verifying on {len(prompts)} prompts ({prompt_source})")
    adapted = load_adapted(source, dtype=dtype, quantized=False, device="cpu", with_tokenizer=False)[0]
    ref = _score(adapted, batch, causal)
    with adapted.disable_adapter():  # the base alone, same weights, no second load
        base = _score(adapted, batch, causal)
    del adapted
    effect = _max_diff(ref["logits"], base["logits"])
    base_ppl = base["ppl"]
    del base
    gc.collect()
    merged_model = getattr(transformers, source.task.auto_model).from_pretrained(str(merged_dir), dtype=getattr(torch, dtype))
    merged = _score(merged_model.eval(), batch, causal)
    del merged_model
    gc.collect()

    diff = _max_diff(ref["logits"], merged["logits"])
    scale = max(1.0, max(float(a.abs().max()) for a in ref["logits"]))
    tol = TOLERANCE[dtype] * scale
    failures = []
    if not (math.isfinite(diff) and diff <= tol):
        failures.append(f"merged model differs from base+adapter by {diff:.3g} > tolerance {tol:.3g}")
    # An adapter that moves no logit by more than one rounding step of the largest one (zero lora_B, say) has
    # no effect to preserve: the ratio would be noise over ~0, so it is reported as not checked.
    negligible = math.isfinite(effect) and effect <= torch.finfo(getattr(torch, dtype)).eps * scale
    ratio = None if negligible or effect == 0 else diff / effect
    preserved = None if ratio is None else bool(math.isfinite(ratio) and ratio < MAX_EFFECT_RATIO)
    if preserved is False:
        failures.append(f"the adapter's effect is not preserved: merge error is {ratio:.0%} of it "
                        f"(limit {MAX_EFFECT_RATIO:.0%})" + (f"; {dtype} may have rounded a small adapter away, "
                                                             f"a float32 merge keeps it" if dtype != "float32"
                                                             and math.isfinite(ratio) and ratio < 0.95 else ""))
    result = {"prompts": len(prompts), "prompt_source": prompt_source, "tokens": sum(int(b["input_ids"].numel()) for b in batch),
              "max_abs_logit_diff": diff, "tolerance": tol, "max_abs_logit": scale,
              "adapter_effect": effect, "adapter_effect_negligible": bool(negligible),
              "merge_error_ratio": ratio, "max_merge_error_ratio": MAX_EFFECT_RATIO, "effect_preserved": preserved,
              "perplexity_base": base_ppl, "perplexity_adapter": ref["ppl"], "perplexity_merged": merged["ppl"],
              "perplexity_on": scored_on if causal else None, "scored_tokens": ref["scored"] if causal else None,
              "quantized": None}
    if causal and ref["ppl"] is not None:
        rel = abs(merged["ppl"] - ref["ppl"]) / ref["ppl"]
        result["perplexity_rel_diff"] = rel
        if not (math.isfinite(rel) and rel <= PPL_TOLERANCE[dtype]):
            failures.append(f"perplexity differs by {rel:.2%} > {PPL_TOLERANCE[dtype]:.0%}")
    result["failures"] = failures
    result["passed"] = not failures

    quant = _training_quantization(source)
    if quant is not None:
        # As training loaded it: quantized, the rest in the dtype policies.weights_dtype gives (fp32 on CPU).
        q = _score(load_adapted(source, device="cpu", with_tokenizer=False)[0], batch, causal)
        gc.collect()
        result["quantized"] = {
            "bits": quant.bits, "quant_type": quant.quant_type if quant.bits == 4 else None,
            "max_abs_logit_diff": _max_diff(q["logits"], merged["logits"]),
            "perplexity_quantized": q["ppl"]}
    return result


def _max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _score(model, batch, causal: bool) -> dict:
    import torch

    logits, nll, count = [], 0.0, 0
    with torch.no_grad():
        for item in batch:
            inputs = {k: v for k, v in item.items() if k != "targets"}
            out = model(**inputs).logits.float()
            logits.append(out[0])
            ids = inputs["input_ids"]
            if "labels" in inputs:  # encoder-decoder: the decoder's logits score the target
                labels = inputs["labels"][0]
                nll += float(torch.nn.functional.cross_entropy(out[0], labels, ignore_index=-100, reduction="sum"))
                count += int((labels != -100).sum())
            elif causal and ids.shape[1] > 1:
                # The next token's loss where training computed one (targets: its labels), else at every token.
                targets = item.get("targets", ids)[0, 1:]
                nll += float(torch.nn.functional.cross_entropy(out[0, :-1], targets, ignore_index=-100,
                                                               reduction="sum"))
                count += int((targets != -100).sum())
    del model
    return {"logits": logits, "ppl": math.exp(nll / count) if count else None, "scored": count}


def _training_quantization(source: AdapterSource):
    """The recipe's quantization section when the adapter was trained on a quantized base, else None."""
    recipe = source.recipe
    if not recipe or not (recipe.get("quantization") or {}).get("bits"):
        return None
    from lorafit.recipe import QuantizationSpec

    return QuantizationSpec.model_validate(recipe["quantization"])


def eval_prompts(source: AdapterSource, tokenizer) -> tuple[list[str], str, bool]:
    """A few rows of the run's eval data (else its train data) rendered as training rendered them, or
    built-in text when the adapter has no run; and whether they are rendered chat (no BOS added)."""
    recipe = None
    try:
        recipe = source.run_recipe()
    except LorafitError:  # a run dir whose recipe no longer validates: still verifiable on built-in text
        pass
    if recipe is not None:
        for key in ("eval", "train"):
            path = _find_data_file(getattr(recipe.data, key), source.run_dir)
            if path is None:
                continue
            rows = read_rows(str(path), where=f"data.{key}")
            # The held-out split is drawn at random; the tail of the train file is the nearest guess.
            rows = rows[:MAX_PROMPTS] if key == "eval" else rows[-MAX_PROMPTS:]
            try:
                texts = [t for t in (_row(r, recipe.data, tokenizer) for r in rows)
                         if (t[0] if isinstance(t, tuple) else t).strip()]
            except LorafitError:  # a row or template that no longer renders: built-in text still proves the merge
                texts = []
            if texts:
                return texts[:MAX_PROMPTS], f"{key} data {path.name}", recipe.data.format == "chat"
    return list(BUILTIN_PROMPTS), "built-in text", False


def trained_rows(source: AdapterSource, tokenizer) -> tuple[list[dict], str, str] | None:
    """Up to MAX_PROMPTS rows of the run's eval data (else the tail of its train data) tokenized as training
    tokenized them (stages.data: input_ids, labels -100 where training computes no loss), cut to data.max_length
    and MAX_ROW_TOKENS; with where they come from and what a perplexity over them measures. None when the adapter
    has no run or its rows no longer tokenize (or keep no trained token): eval_prompts' text is scored then."""
    import torch

    from lorafit.core import libs
    from lorafit.stages.data import text as data_text
    from lorafit.stages.data.read import Source, read_located

    libs.quiet_libraries()  # datasets' bars: four rows need none
    try:
        recipe = source.run_recipe()
    except LorafitError:
        return None
    if recipe is None:
        return None
    spec = recipe.data.model_copy(update={"max_length": min(recipe.data.max_length, MAX_ROW_TOKENS)})
    for key in ("eval", "train"):
        path = _find_data_file(getattr(recipe.data, key), source.run_dir)
        if path is None:
            continue
        try:
            rows, locs = read_located(str(path), where=f"data.{key}")
            pick = slice(0, MAX_PROMPTS) if key == "eval" else slice(-MAX_PROMPTS, None)
            found = data_text.tokenize([Source(rows[pick], locs[pick], b"", str(path))], spec, tokenizer)
        except LorafitError:  # a row or template that no longer renders, no trained token left: text instead
            continue
        seq2seq = spec.format == "seq2seq"
        batch = [{"input_ids": torch.tensor([r["input_ids"]]),
                  ("labels" if seq2seq else "targets"): torch.tensor([r["labels"]])} for r in found.parts[0]]
        what = ("trained tokens (the target, where training computes its loss)" if seq2seq else
                "trained tokens (the responses" + (" and prompts (data.train_on_inputs)" if spec.train_on_inputs else "")
                + ", where training computes its loss)")
        return batch, f"{key} data {path.name}", what
    return None


def _row(row: dict, spec, tokenizer) -> str | tuple[str, str]:
    """A row as the model reads it: its whole text, or (source, target) for an encoder-decoder."""
    return seq2seq_pair(row, spec) if spec.format == "seq2seq" else row_text(row, spec, tokenizer)


def _inputs(prompts: list, tokenizer, *, chat: bool, seq2seq: bool) -> list[dict]:
    """Model inputs per prompt, as training built them: input_ids, and for an encoder-decoder the target as
    labels (the decoder reads it shifted right), built-in text serving as both source and target."""
    import torch

    if not seq2seq:
        return [{"input_ids": torch.tensor([encode(p, tokenizer, chat=chat)[:MAX_PROMPT_TOKENS]])} for p in prompts]
    pairs = [p if isinstance(p, tuple) else (p, p) for p in prompts]
    inputs, labels = seq2seq_tokens([s for s, _ in pairs], [t for _, t in pairs], tokenizer)
    return [{"input_ids": torch.tensor([i[:MAX_PROMPT_TOKENS]]), "labels": torch.tensor([t[:MAX_PROMPT_TOKENS]])}
            for i, t in zip(inputs, labels)]


def _find_data_file(name: str | None, run_dir: Path | None) -> Path | None:
    if not name:
        return None
    for cand in (Path(name), *((run_dir / name, run_dir.parent / name) if run_dir else ())):
        if cand.is_file() and cand.suffix in SUFFIXES:
            return cand
    return None
