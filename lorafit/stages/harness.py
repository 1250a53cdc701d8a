"""`lorafit evaluate RUN --lm-eval TASKS`: EleutherAI's lm-evaluation-harness (the optional extra lmeval) on
base and adapter, handed the model lorafit loaded (so a GGUF or a quantized base works as it trained), the
results side by side.

Besides the harness's own tasks (mmlu, hellaswag, ... where it can download them), LOCAL is a task lorafit
writes over the run's held-out rows, as the evaluate stage generates them: each prompt token for token as
training built it (decoded once, checked to encode back the same), the same stop tokens, the same
max_new_tokens, greedy, and lorafit's own answer normalisation for exact_match and contains; its scores
equal the evaluate stage's exact_match row for row. The harness's printing goes to stderr: `--json` keeps
stdout to its one document.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import sys
import tempfile
from pathlib import Path

from lorafit import log
from lorafit.errors import LorafitError

LOCAL = "lorafit_heldout"

_UTILS = '''"""process_results of lorafit's held-out task: lorafit's own normalisation (lorafit.core.metrics)."""
from lorafit.core.metrics import contains, exact_match


def process_results(doc, results):
    answer = results[0]
    return {"exact_match": float(exact_match(answer, doc["reference"])),
            "contains": float(contains(answer, doc["reference"]))}
'''


def task_names(text: str) -> list[str]:
    """--lm-eval's comma-separated task names; the harness must be installed (checked before any model loads)."""
    import importlib.util

    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise LorafitError("no task named", where="--lm-eval", fix=f"name tasks, e.g. --lm-eval {LOCAL},hellaswag")
    if importlib.util.find_spec("lm_eval") is None:
        raise LorafitError("lm-evaluation-harness is not installed", where="--lm-eval",
                           fix="pip install 'lorafit[lmeval]' (lm-eval), or `make install`")
    return list(dict.fromkeys(names))


def run(model, tokenizer, recipe, names: list[str], *, dataset) -> dict:
    """{version, results: {task: {metric: {base, adapter}}}, per_row: {LOCAL: {base, adapter}}, note}."""
    import lm_eval

    with tempfile.TemporaryDirectory(prefix="lorafit-lm-eval-") as scratch:
        folder = Path(scratch)
        local = LOCAL in names
        add_bos, max_new = False, None
        if local:
            add_bos, max_new = _write_local_task(folder, model, tokenizer, recipe, dataset)
        with contextlib.redirect_stdout(sys.stderr):  # the harness prints tables and progress: stderr only
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager

            others = [n for n in names if n != LOCAL]
            manager = TaskManager(include_path=str(folder) if local else None, include_defaults=bool(others))
            unknown = [n for n in names if n not in manager.all_tasks]
            if unknown:
                near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3, cutoff=0.6)
                raise LorafitError(f"lm-eval has no task {unknown[0]!r}", where="--lm-eval",
                                   fix=(f"did you mean {', '.join(near)}? " if near else "")
                                   + f"`lm-eval ls tasks` lists them; {LOCAL} is the run's held-out rows")
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            lm = HFLM(pretrained=inner, tokenizer=tokenizer, batch_size=1, add_bos_token=add_bos,
                      max_length=_context(inner, tokenizer))
            log.info(f"lm-eval {lm_eval.__version__}: {', '.join(names)} on the adapter, then on the base")
            found = {"adapter": _evaluate(lm, names, manager)}
            if hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    found["base"] = _evaluate(lm, names, manager)
    results: dict = {}
    per_row: dict = {}
    for who, (scores, samples) in found.items():
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                results.setdefault(task, {}).setdefault(metric, {})[who] = value
        if LOCAL in samples:
            per_row.setdefault(LOCAL, {})[who] = [float(s["exact_match"]) for s in
                                                  sorted(samples[LOCAL], key=lambda s: s["doc_id"])]
    out = {"version": lm_eval.__version__, "results": results}
    if per_row:
        out["per_row"] = per_row
        out["note"] = (f"{LOCAL}: the run's first {len(per_row[LOCAL]['adapter'])} held-out rows, as lorafit generates "
                       f"them (max_new_tokens {max_new}, greedy, lorafit's normalisation)")
    return out


def _evaluate(lm, names: list[str], manager) -> tuple[dict, dict]:
    """(task → metric → value, task → samples) of one harness run; stderr values dropped."""
    from lm_eval import simple_evaluate

    found = simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=True, verbosity="WARNING")
    scores = {}
    for task, metrics in (found.get("results") or {}).items():
        scores[task] = {key.split(",", 1)[0]: round(float(v), 4) for key, v in metrics.items()
                        if isinstance(v, (int, float)) and "_stderr" not in key and key != "alias"}
    return scores, found.get("samples") or {}


def _context(model, tokenizer) -> int | None:
    from lorafit.core import policies

    limit = policies.context_limit(getattr(model, "config", None), tokenizer)
    return limit[0] if limit else None


def _write_local_task(folder: Path, model, tokenizer, recipe, dataset) -> tuple[bool, int]:
    """LOCAL's rows (prompt text, reference) and task config in *folder*, as the evaluate stage generates them.
    Returns (whether the harness must add BOS, max_new_tokens)."""
    import yaml

    from lorafit.core import policies, tasks
    from lorafit.core.generation import stop_ids
    from lorafit.core.prompts import bos_id
    from lorafit.stages.eval_common import new_tokens, split_row

    spec, data = recipe.evaluation, recipe.data
    if not tasks.task(recipe.model.task).causal or data.format == "text" or data.train_on_inputs or dataset is None:
        raise LorafitError(f"{LOCAL} needs held-out rows with references of a causal_lm run (data.format alpaca, "
                           "completion or chat)", where="--lm-eval", fix="name the harness's own tasks only")
    n = len(dataset) if spec.generate_samples is None else min(len(dataset), spec.generate_samples)
    pairs = [p for p in (split_row(r["input_ids"], r["labels"]) for r in dataset.select(range(n))) if p and p[0]]
    stop = stop_ids(tokenizer, data)
    context = policies.context_limit(getattr(model, "config", None), tokenizer)
    max_new, _ = new_tokens(spec, [len(r) for _, r in pairs], [len(p) for p, _ in pairs], context)
    bos = bos_id(tokenizer)
    add_bos = data.format != "chat" and bos is not None and all(p[:1] == [bos] for p, _ in pairs)
    docs = []
    for prompt, reference in pairs:
        ids = prompt[1:] if add_bos else prompt
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != list(ids):
            raise LorafitError("a held-out prompt does not encode back to the tokens lorafit asks the model, so the "
                               f"harness would not ask the same question", where=f"--lm-eval {LOCAL}",
                               fix="name the harness's own tasks only")
        end = next((k for k, t in enumerate(reference) if t in stop), len(reference))
        docs.append({"prompt": text, "reference": tokenizer.decode(reference[:end], skip_special_tokens=True).strip()})
    rows = folder / "heldout.jsonl"
    rows.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    until = list(dict.fromkeys(tokenizer.decode([t], skip_special_tokens=False) for t in stop))
    config = {"task": LOCAL, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(rows)}},
              "test_split": "test", "output_type": "generate_until", "doc_to_text": "prompt",
              "doc_to_target": "reference", "target_delimiter": "",
              "generation_kwargs": {"until": until, "max_gen_toks": max_new, "do_sample": False},
              "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                              for m in ("exact_match", "contains")]}
    text = yaml.safe_dump(config, sort_keys=False) + "process_results: !function utils.process_results\n"
    (folder / f"{LOCAL}.yaml").write_text(text, encoding="utf-8")
    (folder / "utils.py").write_text(_UTILS, encoding="utf-8")
    return add_bos, max_new
