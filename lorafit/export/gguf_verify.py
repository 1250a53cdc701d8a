"""`lorafit export --to gguf|ollama --verify`: the export answers the run's held-out prompts, greedily, in llama.cpp
(and through transformers' GGUF reader), compared with what the user measured in lorafit.

References: base + the unmerged adapter (lorafit's own generation, as `lorafit evaluate` ran it) and the float32
merge. Each prompt is given to llama.cpp as text and tokenized by the GGUF's own tokenizer, so a lost template,
token or stop id shows: the prompt ids must be lorafit's, the GGUF's chat template the one trained with, its stop
ids must hold lorafit's. At f16 every prompt must be answered as lorafit answers it, and the GGUF LoRA on the
exported base must answer as the merged GGUF does; q8_0 and k-quants report both agreements (goal ≥ 90 %).
Every prompt that differs is named. llama.cpp runs in a child process (a crash is a failed check), quantized files one token at a time.
"""

from __future__ import annotations

from pathlib import Path

from lorafit import log
from lorafit.core import models, tasks
from lorafit.core.gguf import gguf_metadata_memo
from lorafit.core.generation import generate_greedy, stop_ids
from lorafit.core.prompts import bos_id
from lorafit.errors import LorafitError

GOAL = 0.90  # identical answers, quantized files vs lorafit


def held_out(recipe, tokenizer, limit: int | None = None) -> tuple[list[list[int]], list[str]]:
    """(prompt ids, reference answers) of the run's held-out rows, token for token as training built them."""
    from lorafit.stages.data import build_datasets
    from lorafit.stages.evaluate import split_row

    bundle = build_datasets(recipe.data, tokenizer, recipe.model.task)
    if bundle.eval is None or len(bundle.eval) == 0:
        raise LorafitError("the run has no held-out rows (data.eval_fraction 0 and no data.eval)", where="--verify",
                           fix="drop --verify, or export a run that held rows out")
    rows = bundle.eval if limit is None else bundle.eval.select(range(min(limit, len(bundle.eval))))
    stop = stop_ids(tokenizer, recipe.data)
    pairs = [p for p in (split_row(r["input_ids"], r["labels"]) for r in rows) if p and p[0]]
    return [p for p, _ in pairs], [_decode(tokenizer, ref, stop) for _, ref in pairs]


def _decode(tokenizer, ids: list[int], stop: list[int]) -> str:
    end = next((k for k, t in enumerate(ids) if t in stop), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


def verify_export(source, recipe, tokenizer, files: dict, merged_dir: Path, quant: str, *,
                  limit: int | None = None) -> dict:
    import torch

    prompts, refs = held_out(recipe, tokenizer, limit)
    stop = stop_ids(tokenizer, recipe.data)
    max_new = recipe.evaluation.max_new_tokens or (max(len(tokenizer(r)["input_ids"]) for r in refs) + 8)
    log.info(f"export: verifying on {len(prompts)} held-out prompts (greedy, up to {max_new} new tokens)")

    def answer(model) -> list[str]:
        with torch.no_grad():
            return generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new, stop=stop)

    model, _ = models.load_adapted(source, with_tokenizer=False)
    answers = {"lorafit": answer(model)}
    del model
    auto = tasks.auto_model_class(recipe.model.task)
    answers["merged"] = answer(auto.from_pretrained(str(merged_dir), dtype=torch.float32).eval())

    # The text llama.cpp is given: the prompt as lorafit renders it, less the BOS lorafit's tokenizer adds (its
    # GGUF says add_bos_token and llama.cpp adds it back); a BOS the template writes stays in the text.
    bos = bos_id(tokenizer)
    texts = [tokenizer.decode(p[1:] if bos is not None and p[:1] == [bos] else p, skip_special_tokens=False)
             for p in prompts]
    quantized = quant != "f16"
    jobs = [{"op": "answer", "model": str(files["merged"]), "prompts": texts, "max_new_tokens": max_new,
             "n_ctx": max(len(p) for p in prompts) + max_new + 8, "one_token_at_a_time": quantized}]
    if "lora" in files:
        jobs.append({**jobs[0], "model": str(files["base"]), "lora": str(files["lora"])})
    from lorafit.export import llamacpp

    results, crashed = llamacpp.run_child(jobs)
    checks, failures = {}, []
    if crashed:
        failures.append(f"{crashed} after {len(results)} of {len(jobs)} file(s)")
    if results:
        gguf = results[0]
        answers["gguf"] = [_decode(tokenizer, a["ids"], []) for a in gguf["answers"]]
        checks.update(_file_checks(gguf, prompts, tokenizer, recipe, stop, failures))
    if len(results) > 1:
        answers["gguf_lora"] = [_decode(tokenizer, a["ids"], []) for a in results[1]["answers"]]
    answers["transformers_gguf"] = _transformers_answers(auto, files["merged"], prompts, tokenizer, max_new, stop,
                                                         failures)

    compared = {}
    for key, against in (("merged", "lorafit"), ("gguf", "lorafit"), ("gguf", "merged"), ("gguf_lora", "gguf"),
                         ("transformers_gguf", "lorafit")):
        if key in answers and against in answers and answers[key] is not None:
            compared[f"{key}_vs_{against}"] = _agreement(answers[key], answers[against], prompts, tokenizer)
    gguf_vs = compared.get("gguf_vs_lorafit")
    if quant == "f16":
        failures += f16_failures(compared)
    exact = {k: sum(a == r for a, r in zip(v, refs)) / len(refs) for k, v in answers.items() if v}
    return {"prompts": len(prompts), "quant": quant, "max_new_tokens": max_new, "checks": checks,
            "agreement": compared, "exact_match": exact,
            "goal": GOAL if quantized else 1.0,
            "goal_met": bool(gguf_vs) and gguf_vs["rate"] >= (GOAL if quantized else 1.0),
            "passed": not failures, "failures": failures,
            "samples": [{"prompt": texts[i], "reference": refs[i], **{k: v[i] for k, v in answers.items() if v}}
                        for i in range(min(3, len(prompts)))]}


# At f16 these must agree on every prompt: (comparison, what differs from what).
F16_IDENTICAL = {"gguf_vs_lorafit": "the f16 GGUF answers {n} of {of} prompts differently from lorafit",
                 "gguf_lora_vs_gguf": "the GGUF LoRA on the exported f16 base answers {n} of {of} prompts differently "
                                      "from the merged f16 GGUF"}


def f16_failures(compared: dict) -> list[str]:
    """What an f16 export fails on: any prompt answered differently in F16_IDENTICAL's comparisons."""
    return [text.format(n=c["prompts"] - c["identical"], of=c["prompts"]) for key, text in F16_IDENTICAL.items()
            if (c := compared.get(key)) and c["identical"] < c["prompts"]]


def _file_checks(gguf: dict, prompts, tokenizer, recipe, stop: list[int], failures: list[str]) -> dict:
    """The GGUF asks as lorafit asks: same prompt ids, the trained chat template, every stop id."""
    meta = gguf["metadata"]
    differ = [i for i, (a, p) in enumerate(zip(gguf["answers"], prompts)) if a["prompt_ids"] != list(p)]
    if differ:
        first = gguf["answers"][differ[0]]["prompt_ids"]
        failures.append(f"the GGUF's tokenizer gives other prompt ids on {len(differ)} of {len(prompts)} prompts "
                        f"(first: prompt {differ[0] + 1}, {len(first)} ids vs lorafit's {len(prompts[differ[0]])})")
    template = getattr(tokenizer, "chat_template", None)
    template_ok = not isinstance(template, str) or meta.get("tokenizer.chat_template") == template
    if recipe.data.format == "chat" and not template_ok:
        failures.append("the GGUF's tokenizer.chat_template is not the template the adapter was trained with")
    missing = sorted(set(stop) - set(gguf["stop_ids"]))
    if missing:
        failures.append(f"the GGUF does not stop at {', '.join(tokenizer.convert_ids_to_tokens(missing))} "
                        f"(ids {missing}); lorafit does")
    return {"prompt_ids_identical": len(prompts) - len(differ), "chat_template_identical": template_ok,
            "stop_ids": {"lorafit": stop, "gguf": gguf["stop_ids"]},
            "metadata": {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}}


def _transformers_answers(auto, path: Path, prompts, tokenizer, max_new: int, stop: list[int],
                          failures: list[str]) -> list[str] | None:
    """The merged GGUF read back by transformers (its GGUF reader dequantizes it), answering the same ids."""
    import gguf
    import torch
    from transformers import modeling_gguf_pytorch_utils as legacy

    # transformers parses the file with gguf-py twice (config, then weights: seconds each for a 49k-token
    # vocabulary): one parse serves both. Its own progress bar would be drawn past our log.
    parse, bar, parsed = gguf.GGUFReader, getattr(legacy, "tqdm", None), {}
    gguf.GGUFReader = lambda file, *a, **k: parsed.setdefault(str(file), parse(file, *a, **k))
    legacy.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        with gguf_metadata_memo():
            model = auto.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # a type or architecture transformers' reader does not take
        failures.append(f"transformers cannot read {path.name}: {str(e).splitlines()[0][:200]}")
        return None
    finally:
        gguf.GGUFReader = parse
        if bar is not None:
            legacy.tqdm = bar
        parsed.clear()
    with torch.no_grad():
        return generate_greedy(model.eval(), tokenizer, prompts, max_new_tokens=max_new, stop=stop)


def _agreement(answers: list[str], against: list[str], prompts, tokenizer) -> dict:
    differ = [i for i, (a, b) in enumerate(zip(answers, against)) if a != b]
    n = len(answers)
    return {"prompts": n, "identical": n - len(differ), "rate": (n - len(differ)) / n if n else 1.0,
            "differing": [{"prompt": i + 1, "text": tokenizer.decode(prompts[i], skip_special_tokens=True)[-120:],
                           "answer": answers[i], "expected": against[i]} for i in differ[:20]]}
