"""The model card (README.md with YAML front matter) pushed with an adapter or a merged model.

Built from what the run directory says about itself: the resolved recipe, metrics.json and, for a
merged model, merge_report.json. Local paths never leave the machine: a local base model or data file
is named by its basename only.
"""

from __future__ import annotations

from pathlib import Path

from lorafit.core import tasks
from lorafit.core.hub import hub_id


def build_card(*, repo_id: str, kind: str, base: str | None, recipe: dict | None = None,
               metrics: dict | None = None, merge_report: dict | None = None) -> str:
    """README.md text. *kind* is 'adapter' or 'merged'. Metadata goes through huggingface_hub's
    ModelCardData, which validates it and writes the front matter the hub reads."""
    from huggingface_hub import ModelCard, ModelCardData

    recipe = recipe or {}
    quant = (recipe.get("quantization") or {})
    bits = quant.get("bits")
    task = tasks.task((recipe.get("model") or {}).get("task"))
    base_id = hub_id(base)
    meta: dict = {}
    if base_id:
        meta["base_model"] = base_id
    if kind == "adapter":
        meta["library_name"] = "peft"
    else:
        meta["library_name"] = "transformers"
    license_ = (recipe.get("output") or {}).get("license")
    if license_:
        meta["license"] = license_
    tags = ["lorafit", "lora"] + (["qlora"] if bits == 4 else []) + (["8-bit"] if bits == 8 else [])
    tags += ["peft"] if kind == "adapter" else ["merged"]
    if base_id and kind == "adapter":
        tags.append(f"base_model:adapter:{base_id}")
    meta["tags"] = tags
    meta["pipeline_tag"] = task.pipeline_tag
    dataset = _dataset(recipe)
    if dataset and dataset[1]:
        meta["datasets"] = [dataset[0]]

    name = repo_id.split("/")[-1]
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else \
        f"a local model (`{Path(base).name}`)" if base else "an unknown base model"
    out = [f"# {name}", ""]
    if kind == "adapter":
        method = f"QLoRA ({bits}-bit {quant.get('quant_type', 'nf4')} base)" if bits == 4 else \
            "LoRA on an 8-bit base" if bits == 8 else "LoRA"
        out += [f"A {method} adapter for {base_text}, trained with lorafit.", ""]
    else:
        out += [f"{base_text[0].upper() + base_text[1:]} with a LoRA adapter merged into its weights "
                f"({(merge_report or {}).get('dtype', 'bfloat16')}), made with lorafit.", ""]
    out += _origin((metrics or {}).get("base_origin"), base_id)
    out += _usage(repo_id, kind, task)
    out += _training(recipe, dataset)
    out += _metrics(metrics)
    out += _merge_section(merge_report)
    body = "\n".join(out).rstrip() + "\n"
    card = ModelCard(f"---\n{ModelCardData(**meta).to_yaml()}\n---\n\n{body}")
    return str(card)


def _origin(origin: dict | None, base_id: str | None) -> list[str]:
    """A GGUF base said for what it is: the weights trained on were dequantized from a (quantized) file."""
    if not origin:
        return []
    original = f"safetensors of {base_id}" if base_id else "safetensors weights"
    return [f"Base weights: `{origin['gguf_file']}` ({origin['quantization']}), dequantized to "
            f"{origin['dequantized_to']} by lorafit. The adapter was trained on these, not the original {original}; "
            "on those its effect may differ slightly.", ""]


def _dataset(recipe: dict) -> tuple[str, bool] | None:
    """(name to show, is a hub dataset id) for the recipe's training data."""
    train = (recipe.get("data") or {}).get("train")
    if not train:
        return None
    local = Path(train).suffix.lower() in (".jsonl", ".json", ".csv", ".parquet", ".txt") or Path(train).exists()
    return (Path(train).name, False) if local else (train, hub_id(train) is not None)


def _usage(repo_id: str, kind: str, task: tasks.Task) -> list[str]:
    if kind == "adapter":
        auto = task.auto_peft
        code = [f"from peft import {auto}", "from transformers import AutoTokenizer", "",
                f'model = {auto}.from_pretrained("{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    else:
        auto = task.auto_model
        code = [f"from transformers import {auto}, AutoTokenizer", "",
                f'model = {auto}.from_pretrained("{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    return ["## Usage", "", "```python", *code, "```", ""]


def _training(recipe: dict, dataset) -> list[str]:
    if not recipe:
        return []
    lora, train, quant = recipe.get("lora") or {}, recipe.get("training") or {}, recipe.get("quantization") or {}
    data = recipe.get("data") or {}
    rows = [("LoRA rank / alpha", f"{lora.get('r')} / {lora.get('alpha')}"),
            ("target modules", _fmt(lora.get("target_modules"))),
            ("dropout", lora.get("dropout"))]
    if lora.get("use_dora") or lora.get("use_rslora"):
        rows.append(("variant", "DoRA" if lora.get("use_dora") else "rsLoRA"))
    if quant.get("bits"):
        detail = f"{quant.get('quant_type')}, double quant {quant.get('double_quant')}, " \
                 f"compute {quant.get('compute_dtype')}" if quant["bits"] == 4 else "LLM.int8()"
        rows.append(("quantization", f"{quant['bits']}-bit ({detail})"))
    if dataset:
        rows.append(("data", f"{dataset[0]} ({data.get('format', 'text')} format"
                             f"{', local file' if not dataset[1] else ''})"))
    rows += [("max length", data.get("max_length")),
             ("epochs / max steps", f"{train.get('epochs')} / {train.get('max_steps') or '-'}"),
             ("batch size × grad accum", f"{train.get('batch_size')} × {train.get('grad_accum')}"),
             ("learning rate", f"{train.get('learning_rate')} ({train.get('lr_scheduler')})"),
             ("optimizer", train.get("optim"))]
    return ["## Training", "", "| setting | value |", "|---|---|",
            *[f"| {k} | {v} |" for k, v in rows if v is not None], ""]


def _metrics(metrics: dict | None) -> list[str]:
    flat = _flatten(metrics or {})
    if not flat:
        return []
    return ["## Metrics", "", "| metric | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in flat], ""]


def _merge_section(report: dict | None) -> list[str]:
    v = (report or {}).get("verify")
    if not v:
        return []
    lines = ["## Merge check", "",
             f"On {v['prompts']} prompts ({v['tokens']} tokens) the merged model's logits differ from base + adapter "
             f"by at most {v['max_abs_logit_diff']:.3g} (tolerance {v['tolerance']:.3g}: "
             f"{'passed' if v['passed'] else 'failed'})."]
    if "adapter_effect" in v:
        if v["merge_error_ratio"] is None:
            lines.append(f"The adapter itself moves the base's logits by at most {v['adapter_effect']:.3g}, within "
                         f"rounding, so the merge error is not compared with it.")
        else:
            lines.append(f"The adapter itself moves the base's logits by up to {v['adapter_effect']:.3g}; the merge "
                         f"error is {v['merge_error_ratio']:.1%} of that (limit {v['max_merge_error_ratio']:.0%}: "
                         f"{'passed' if v.get('effect_preserved', True) else 'failed'}).")
    if v.get("perplexity_adapter") is not None:
        base_ppl = f"base {v['perplexity_base']:.4f}, " if v.get("perplexity_base") is not None else ""
        on = f" on {v['scored_tokens']:,} {v['perplexity_on']} of {v['prompt_source']}" if v.get("perplexity_on") else ""
        lines.append(f"Perplexity{on}: {base_ppl}base + adapter {v['perplexity_adapter']:.4f}, "
                     f"merged {v['perplexity_merged']:.4f}.")
    q = v.get("quantized")
    if q:
        lines.append(f"The adapter was trained on a {q['bits']}-bit base; the merged model differs from that "
                     f"quantized model by at most {q['max_abs_logit_diff']:.3g} in logits "
                     f"(perplexity {q['perplexity_quantized']:.4f} quantized vs {v['perplexity_merged']:.4f} merged).")
    return lines + [""]


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((key, v))
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def build_blend_card(record: dict, *, name: str) -> str:
    """README.md of a `lorafit blend` adapter: what it was built from (sources, weights, method, density)."""
    from huggingface_hub import ModelCard, ModelCardData

    task = tasks.task(record.get("task"))
    base, base_id = record.get("base"), hub_id(record.get("base"))
    meta: dict = {"library_name": "peft", "tags": ["lorafit", "lora", "peft", "merge"], "pipeline_tag": task.pipeline_tag}
    if base_id:
        meta["base_model"] = base_id
        meta["tags"].append(f"base_model:adapter:{base_id}")
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else \
        f"a local model (`{Path(base).name}`)" if base else "an unknown base model"
    density = f", density {record['density']:g}" if record.get("density") is not None else ""
    seed = f", seed {record['seed']}" if record.get("seed") is not None else ""
    out = [f"# {name}", "",
           f"A LoRA adapter for {base_text}, blended by `lorafit blend` from {len(record['sources'])} adapters with "
           f"peft's `add_weighted_adapter` (method `{record['method']}`{density}{seed}); rank {record['r']}.", "",
           "## Sources", "", "| name | adapter | weight | r | alpha | target modules |", "|---|---|---|---|---|---|",
           *[f"| {s['name']} | `{s['dir']}` | {s['weight']:g} | {s['r']} | {s['alpha']} | {_fmt(s['target_modules'])} |"
             for s in record["sources"]], ""]
    out += _usage(name, "adapter", task)
    body = "\n".join(out).rstrip() + "\n"
    return str(ModelCard(f"---\n{ModelCardData(**meta).to_yaml()}\n---\n\n{body}"))
