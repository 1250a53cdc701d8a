"""`lorafit predict`: one prediction per input row, in input order, written as JSONL.

Rows are read and checked like training data (``file:line`` errors, before any weights load), rendered as
training rendered them (the run's data section: format, columns, templates, max_length), and run through
base + adapter loaded as every other command loads it (core.models.load_adapted), in batches.

What each task writes per row:
  seq_cls     {"label": class name (or id when the adapter has no names), "score": its probability}
  token_cls   {"tokens": the row's words, "tags": one tag per word (null past data.max_length)}
  causal_lm   {"generated": greedy continuation of the row's prompt}
  seq2seq_lm  {"generated": greedy output for the row's source text}
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.core import libs, models, tasks
from lorafit.core.adapters import find_adapter
from lorafit.core.files import atomic_write
from lorafit.core.generation import generate_greedy, prompt_ids, stop_ids
from lorafit.core.prompts import column, infer_format
from lorafit.errors import LorafitError
from lorafit.recipe import DataSpec
from lorafit.stages.data.read import read_located
from lorafit.stages.data.tokens import read_words
from lorafit.stages.predict import classify_texts, tag_words


def predict(path: str | Path, data: str | Path, output: str | Path, *, batch_size: int = 8,
            max_new_tokens: int = 64) -> dict:
    """Predict every row of *data* with the adapter at *path*; write *output* (JSONL) atomically."""
    source = find_adapter(path)  # before the heavy imports: a wrong path fails at once
    data, output = Path(data), Path(output)
    if output.exists() and data.exists() and output.resolve() == data.resolve():
        raise LorafitError(f"{output} is also the --data file", where="--output",
                           fix="write the predictions to another file")
    if output.is_dir():  # checked now: os.replace onto a folder would fail after the whole run
        raise LorafitError(f"{output} is a folder", where="--output",
                           fix=f"name a file, e.g. --output {output / 'predictions.jsonl'}")
    if not output.parent.is_dir():
        raise LorafitError(f"no folder {output.parent}", where="--output", fix="create it, or write elsewhere")
    rows, locs = read_located(str(data), where="--data")
    task = source.task
    spec = _data_spec(source, data, rows[0], task)
    libs.quiet_libraries()
    model, tokenizer = models.load_adapted(source)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batches need a pad id (training set the same)
    if task.labelled:
        run = tag_words if task.per_word else classify_texts
        # Rows are checked before the first batch runs: a bad row fails in seconds.
        inputs = [read_words(r, loc, spec) if task.per_word else column(r, loc, spec, "text", "text to classify")
                  for r, loc in zip(rows, locs)]
        predictions = run(model, tokenizer, inputs, spec.max_length, batch_size)
    else:  # each row's prompt (an encoder-decoder: its source) as training rendered and tokenized it
        seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        prompts = [prompt_ids(r, tokenizer, spec, seq2seq=seq2seq, loc=loc) for r, loc in zip(rows, locs)]
        generated = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                    stop=stop_ids(tokenizer, spec), batch_size=batch_size, desc="predict")
        predictions = [{"generated": g} for g in generated]
    _write_jsonl(output, predictions)
    return {"task": task.name, "rows": len(predictions), "data": str(data), "output": str(output),
            "adapter": str(source.adapter_dir), "format": spec.format}


def _data_spec(source, data: Path, first: dict, task: tasks.Task) -> DataSpec:
    """The run's data section (so rows render exactly as in training), else one fitted to the task and the rows:
    the task's own format, or for a task of several formats the one the rows' columns show."""
    try:
        recipe = source.run_recipe()
    except LorafitError:
        recipe = None
    if recipe is not None:
        return recipe.data.model_copy(update={"train": str(data), "eval": None})
    fmt = task.formats[0] if len(task.formats) == 1 else infer_format(first)
    if fmt not in task.formats:
        fmt = "completion" if "prompt" in first else "text"
    return DataSpec(train=str(data), format=fmt)


def _write_jsonl(path: Path, predictions: list[dict]) -> None:
    """Whole or not at all (core.files): a failed or interrupted run never leaves a half-written output."""
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for p in predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")

    atomic_write(path, write)
