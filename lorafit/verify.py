"""`lorafit merge --verify`: prove the merged model computes what base + adapter computes.

Logits and perplexity of both on a few prompts (the run's data when known, else built-in text), models
loaded one at a time so RAM stays near one copy of the base; for a QLoRA-trained adapter, also the gap
between the 16-bit merge and the quantized model the adapter was trained on.
"""

from __future__ import annotations

import math
from pathlib import Path

from lorafit import log
from lorafit.adapters import AdapterSource
from lorafit.merge import load_adapted
from lorafit.stages.data import SUFFIXES, read_rows

# Max |logit difference| merged vs base+adapter allowed, relative to the largest |logit| (at least 1).
# fp32 merges are exact up to summation order. 16-bit merges round W + ΔW where base+adapter rounds W·x and
# ΔW·x apart: on the tiny test model that alone moves bf16 logits by ~6 % of the largest (fp16: ~0.4 %).
TOLERANCE = {"float32": 1e-5, "float16": 3e-2, "bfloat16": 1.5e-1}
PPL_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}  # relative perplexity difference
BUILTIN_PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time, a small model learned to answer questions about the weather and colours.",
]
MAX_PROMPTS, MAX_PROMPT_TOKENS = 4, 64



def verify_merged(merged_dir: str | Path, source: AdapterSource, *, dtype: str) -> dict:
    """Logits and perplexity of the merged model vs base+adapter (and vs the quantized model for QLoRA).

    Models are loaded one at a time, so RAM stays at about one copy of the base.
    """
    import gc

    import torch
    import transformers

    prompts, prompt_source = eval_prompts(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(merged_dir))
    batch = [tokenizer(p, return_tensors="pt", truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]
             for p in prompts]
    causal = source.auto_class == "AutoModelForCausalLM"

    log.info(f"verifying on {len(prompts)} prompts ({prompt_source})")
    ref = _score(load_adapted(source, dtype), batch, causal)
    gc.collect()
    merged_model = getattr(transformers, source.auto_class).from_pretrained(str(merged_dir), dtype=getattr(torch, dtype))
    merged = _score(merged_model.eval(), batch, causal)
    del merged_model
    gc.collect()

    diff = max(float((a - b).abs().max()) for a, b in zip(ref["logits"], merged["logits"]))
    scale = max(1.0, max(float(a.abs().max()) for a in ref["logits"]))
    tol = TOLERANCE[dtype] * scale
    passed = math.isfinite(diff) and diff <= tol
    result = {"prompts": len(prompts), "prompt_source": prompt_source, "tokens": sum(int(b.numel()) for b in batch),
              "max_abs_logit_diff": diff, "tolerance": tol, "max_abs_logit": scale,
              "perplexity_adapter": ref["ppl"], "perplexity_merged": merged["ppl"], "quantized": None}
    if causal and ref["ppl"] is not None:
        rel = abs(merged["ppl"] - ref["ppl"]) / ref["ppl"]
        result["perplexity_rel_diff"] = rel
        passed = passed and math.isfinite(rel) and rel <= PPL_TOLERANCE[dtype]
    result["passed"] = bool(passed)

    quant = _training_quantization(source)
    if quant is not None:
        q = _score(_load_quantized_adapted(source, quant), batch, causal)
        gc.collect()
        result["quantized"] = {
            "bits": quant.bits, "quant_type": quant.quant_type if quant.bits == 4 else None,
            "max_abs_logit_diff": max(float((a - b).abs().max()) for a, b in zip(q["logits"], merged["logits"])),
            "perplexity_quantized": q["ppl"]}
    return result


def _score(model, batch, causal: bool) -> dict:
    import torch

    logits, nll, count = [], 0.0, 0
    with torch.no_grad():
        for ids in batch:
            out = model(input_ids=ids).logits.float()
            logits.append(out[0])
            if causal and ids.shape[1] > 1:
                loss = torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:], reduction="sum")
                nll += float(loss)
                count += ids.shape[1] - 1
    del model
    return {"logits": logits, "ppl": math.exp(nll / count) if count else None}


def _training_quantization(source: AdapterSource):
    """The recipe's quantization section when the adapter was trained on a quantized base, else None."""
    recipe = source.recipe
    if not recipe or not (recipe.get("quantization") or {}).get("bits"):
        return None
    from lorafit.recipe import QuantizationSpec

    return QuantizationSpec.model_validate(recipe["quantization"])


def _load_quantized_adapted(source: AdapterSource, spec):
    from lorafit.stages.quantize import bnb_config, silence_bitsandbytes

    import torch

    silence_bitsandbytes()
    # As training loaded it (stages/load.py): unquantized parts in fp32 on CPU, compute dtype on GPU.
    dtype = spec.compute_dtype if torch.cuda.is_available() else "float32"
    return load_adapted(source, dtype, quantization_config=bnb_config(spec))


def eval_prompts(source: AdapterSource) -> tuple[list[str], str]:
    """A few texts from the run's eval data (else its train data), or built-in text when unknown."""
    recipe = source.recipe or {}
    data = recipe.get("data") or {}
    for key in ("eval", "train"):
        path = _find_data_file(data.get(key), source.run_dir)
        if path is None:
            continue
        rows = read_rows(str(path), where=f"data.{key}")
        rows = rows[:MAX_PROMPTS] if key == "eval" else rows
        if key == "train":
            rows = rows[-MAX_PROMPTS:]  # the held-out split is drawn at random; the tail is the nearest guess
        texts = [t for t in (_row_text(r, data) for r in rows) if t.strip()]
        if texts:
            return texts[:MAX_PROMPTS], f"{'eval' if key == 'eval' else 'train'} data {path.name}"
    return list(BUILTIN_PROMPTS), "built-in text"


def _find_data_file(name: str | None, run_dir: Path | None) -> Path | None:
    if not name:
        return None
    for cand in (Path(name), *((run_dir / name, run_dir.parent / name) if run_dir else ())):
        if cand.is_file() and cand.suffix in SUFFIXES:
            return cand
    return None


def _row_text(row: dict, data: dict) -> str:
    cols = {"text": "text", "instruction": "instruction", "input": "input", "output": "output",
            "messages": "messages", "prompt": "prompt", "completion": "completion", **(data.get("columns") or {})}
    fmt = data.get("format", "text")
    if fmt == "alpaca":
        return " ".join(str(row.get(cols[k]) or "") for k in ("instruction", "input", "output"))
    if fmt == "completion":
        return f"{row.get(cols['prompt']) or ''}{row.get(cols['completion']) or ''}"
    if fmt == "chat":
        msgs = row.get(cols["messages"]) or []
        return "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
    return str(row.get(cols["text"]) or "")
