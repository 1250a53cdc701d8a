"""The command line. The only place that prints results (through render.py), catches LorafitError and
sets exit codes.

The pipeline and the commands are imported when a command runs: they bring pydantic and their own
modules, and torch/transformers/peft load inside them, so ``lorafit --help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lorafit import __version__, render
from lorafit.core import tasks
from lorafit.errors import EvaluationInterrupted, LorafitError, RecipeError, TrainingInterrupted

app = typer.Typer(
    name="lorafit",
    help="LoRA / QLoRA fine-tuning of Hugging Face models from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

SET_HELP = "Override a recipe field: --set lora.r=8 (repeatable; values are read as YAML)."
TRUST_HELP = ("Run the Python code the base model ships (its auto_map), said on stderr; a run dir whose recipe has "
              "model.trust_remote_code is refused without it. Read that code first.")
STRICT_HELP = "Make every advice (docs/advice.md) an error, exit 2 (advice.strict)."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorafit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also LORAFIT_DEBUG=1)."),
) -> None:
    if debug:
        os.environ["LORAFIT_DEBUG"] = "1"


def _out(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def _emit(doc, lines, as_json: bool) -> None:
    """A command's result: *doc* as one JSON document with --json, else the text lines: *lines*, or
    lines(doc) when it is a render function (called only then)."""
    if as_json:
        _print_json(doc)
    else:
        _out(lines(doc) if callable(lines) else lines)


def _console():
    from rich.console import Console

    return Console()


def _trusting(allowed: bool):
    """The command at hand may run the base's own code (--trust-remote-code): core.models applies the rule."""
    from lorafit.core.models import trusting_remote_code

    return trusting_remote_code(allowed)


def _recipe(path: Path, overrides: Optional[List[str]], *, output_dir: Optional[Path] = None):
    from lorafit.recipe import load_recipe

    # --output-dir is a path, taken as written: never read as YAML as --set values are ("exp #3", "2024-06-01", "no")
    literal = {"output.dir": str(output_dir)} if output_dir is not None else None
    return load_recipe(path, overrides or [], literal=literal)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Run directory (overrides output.dir)."),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="[CHECKPOINT]",
        help="Resume from the latest checkpoint of the run directory, or from CHECKPOINT."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a finished (or interrupted) run in the run directory (output.overwrite)."),
    force: bool = typer.Option(False, "--force", help="--resume even though the recipe changed (recorded in metrics.json)."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1, help="Train in N processes on this machine (one per GPU), under torchrun."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="With --nproc: machines taking part (run the same command on each)."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="With --nnodes: this machine's rank, 0 to nnodes-1."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="With --nnodes: address of the node-rank-0 machine."),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="With --nnodes: a free port on that machine (default 29500)."),
) -> None:
    """Fine-tune: load → quantize → inject → train → evaluate → save."""
    if nproc is not None or nnodes > 1:
        raise typer.Exit(_launch(nproc, nnodes, node_rank, master_addr, master_port))
    from lorafit.pipeline import train as run_train

    overrides = list(set_ or [])
    if overwrite:
        overrides.append("output.overwrite=true")
    if strict:
        overrides.append("advice.strict=true")
    try:
        result = run_train(_recipe(recipe, overrides, output_dir=output_dir), resume=resume, force=force)
    except TrainingInterrupted as e:  # the same command line, continued
        import shlex

        again = ["lorafit", "train", str(recipe)] + [a for item in (set_ or []) for a in ("--set", item)]
        again += ["--output-dir", str(output_dir)] if output_dir is not None else []
        again += shlex.split(os.environ.get("LORAFIT_LAUNCH_OPTIONS", ""))  # --nproc N ..., when it started us
        e.resume_command = shlex.join(again + ["--resume"])
        raise
    from lorafit.core.distributed import is_main_process

    if is_main_process():
        _out(render.train_lines(result))


_LAUNCH_OPTIONS = {"--nproc": 1, "--nnodes": 1, "--node-rank": 1, "--master-addr": 1, "--master-port": 1}


def _launch(nproc, nnodes, node_rank, master_addr, master_port) -> int:
    """`train ... --nproc N`: the same command line, minus the launcher's options, under torchrun."""
    from lorafit.core.distributed import launch

    if nproc is None:
        raise LorafitError("--nnodes needs --nproc (processes per machine)", where="--nnodes", fix="add --nproc N")
    if not 0 <= node_rank < nnodes:
        raise LorafitError(f"--node-rank {node_rank} is not in 0..{nnodes - 1}", where="--node-rank",
                           fix="number the machines 0 to --nnodes minus 1")
    if nnodes > 1 and master_addr is None:
        raise LorafitError("several machines need the address of the rank-0 machine", where="--master-addr",
                           fix="add --master-addr HOST (the same on every machine)")
    argv, skip, seen_train = [], 0, False
    for arg in _optional_resume_value(sys.argv[1:]):
        name = arg.split("=", 1)[0]
        if skip:
            skip -= 1
        elif name in _LAUNCH_OPTIONS:
            skip = 0 if "=" in arg else _LAUNCH_OPTIONS[name]
        elif not seen_train and arg in ("train", "--debug"):  # --debug is the root's: the workers get LORAFIT_DEBUG
            seen_train = seen_train or arg == "train"
        else:
            argv.append(arg)
    import shlex

    options = ["--nproc", str(nproc)] + (["--nnodes", str(nnodes), "--node-rank", str(node_rank)] if nnodes > 1 else [])
    options += ["--master-addr", master_addr] if master_addr else []
    options += ["--master-port", str(master_port)] if master_port else []
    os.environ["LORAFIT_LAUNCH_OPTIONS"] = shlex.join(options)  # for the resume command the workers print
    return launch(argv, nproc=nproc, nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                  master_port=master_port)


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    show_example: Optional[int] = typer.Option(
        None, "--show-example", metavar="N", min=1,
        help="Also print row N (1-based) of the train split as the model sees it, trained tokens marked. N counts "
             "the rows training gets: dropped rows and, under data.eval_fraction, the held-out rows are taken out "
             "(the rest in the seeded split's order); a packed block under data.packing."),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
) -> None:
    """Run every check that needs no training (schema, files, data rows, model, targets). Writes nothing."""
    import dataclasses

    from lorafit.pipeline import validate as run_validate

    overrides = list(set_ or []) + (["advice.strict=true"] if strict else [])
    report = run_validate(_recipe(recipe, overrides), recipe_path=recipe, show_example=show_example)
    if as_json:
        _print_json(dataclasses.asdict(report))
    else:
        _out(render.validate_lines(report))
        if report.example is not None:
            color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
            _out(["", *render.example_lines(report.example, color=color)])


@app.command("find-targets")
def find_targets(
    model: str = typer.Argument(..., help="Hub id, local model directory, or a directory holding only config.json."),
    r: int = typer.Option(16, "--r", min=1, help="LoRA rank used for the parameter counts."),
    task: str = typer.Option(tasks.DEFAULT, "--task", help=f"Head: {' | '.join(tasks.TASKS)}."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """List the modules that can take LoRA, with exact parameter counts per preset."""
    from lorafit.commands.find_targets import find_targets as run_find_targets

    report = run_find_targets(model, r=r, task=task)
    if as_json:
        _print_json(report)
    else:
        _console().print(render.find_targets_table(report))


@app.command()
def estimate(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Exact trainable parameters and a memory plan for the recipe, without loading weights."""
    from lorafit.commands.estimate import estimate as run_estimate

    report = run_estimate(_recipe(recipe, set_))
    if as_json:
        _print_json(report)
    else:
        _console().print(render.estimate_table(report))


@app.command()
def evaluate(
    run_or_adapter: Path = typer.Argument(..., help="Run directory or adapter directory."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation data file (default: the run's eval split)."),
    lm_eval: Optional[str] = typer.Option(
        None, "--lm-eval", metavar="TASKS",
        help="Also run EleutherAI's lm-evaluation-harness tasks (comma-separated) on base and adapter; "
             "lorafit_heldout is the run's held-out rows as lorafit measures them (extra: lorafit[lmeval])."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Base vs base + adapter on the same rows: eval loss, perplexity and the task's metrics (exact match /
    contains of greedy generations, or accuracy / macro-F1), the rows the adapter gets wrong, forgetting
    (evaluation.retain) and the baselines, with sample generations; --lm-eval adds the harness's tasks. For a run
    dir, also rewrites its report.md and eval_predictions.jsonl."""
    from lorafit.commands.evaluate import evaluate_adapter

    with _trusting(trust_remote_code):
        report = evaluate_adapter(run_or_adapter, data, lm_eval=lm_eval)
    _emit(report, render.evaluate_lines, as_json)


@app.command()
def merge(
    adapter_dir: Path = typer.Argument(..., help="Adapter directory (or run directory)."),
    output: Path = typer.Option(..., "--output", help="Where to write the merged model."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model (default: from adapter_config.json)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 | float16 | float32."),
    verify: bool = typer.Option(False, "--verify", help="Compare merged vs base+adapter logits; write merge_report.json."),
    low_memory: bool = typer.Option(False, "--low-memory", help="Merge shard by shard (RAM ≈ one shard)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest safetensors shard."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace a non-empty --output directory."),
    force: bool = typer.Option(False, "--force", hidden=True, help="The old name of --overwrite."),
    as_json: bool = typer.Option(False, "--json", help="Print the merge report as one JSON document."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Fold the adapter into a base reloaded in 16/32-bit (never 4-bit) and save a plain model."""
    from lorafit.commands.merge import merge as run_merge

    if force:
        typer.echo("warning: --force is an alias of --overwrite (the one flag for replacing what is there)", err=True)
    with _trusting(trust_remote_code):
        report = run_merge(adapter_dir, output, base=base, dtype=dtype, verify=verify,
                           low_memory=low_memory, max_shard_size=max_shard_size, overwrite=overwrite or force)
    _emit(report, render.merge_lines, as_json)
    if verify and not report.get("verify", {}).get("passed", True):
        raise typer.Exit(1)


@app.command()
def push(
    path: Path = typer.Argument(..., help="Adapter dir, run dir, or merged model dir."),
    repo_id: str = typer.Option(..., "--repo-id", help="OWNER/NAME on the hub."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to push to."),
    merged: bool = typer.Option(False, "--merged", help="Merge (bf16 base) and push the full model instead."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded and the card; no network."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Upload an adapter (or merged model) with a model card."""
    from lorafit.commands.push import push as run_push

    with _trusting(trust_remote_code):  # --merged loads the base
        result = run_push(path, repo_id=repo_id, private=private, revision=revision, merged=merged, dry_run=dry_run)
    _emit(result, render.push_lines, as_json)


@app.command()
def generate(
    model: Optional[str] = typer.Argument(None, help="Adapter dir, run dir, or model (or use --adapter)."),
    prompt: str = typer.Option(..., "--prompt", help="Prompt text, rendered as the adapter's training rows were."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    adapter: Optional[List[str]] = typer.Option(
        None, "--adapter", metavar="NAME=DIR",
        help="An adapter (or run) dir under a name; repeat to load several on one base and switch between them."),
    use: Optional[str] = typer.Option(None, "--use", metavar="NAME", help="Answer with this --adapter (default: the first)."),
    compare: bool = typer.Option(False, "--compare", help="Answer with every adapter and with the base, one after another."),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="Answer with the base model, the adapter disabled."),
    system: Optional[str] = typer.Option(None, "--system", metavar="TEXT", help="System prompt (chat-trained adapters)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 (default): greedy; above 0: sample."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling: keep this much probability mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling: the same seed, the same answer."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (every answer, token counts)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Answer a prompt with base + adapter, several adapters on one base, or a plain model."""
    from lorafit.commands.generate import Sampling
    from lorafit.commands.generate import generate as run_generate

    # Text is streamed as it comes only to a terminal, and only for a single answer.
    stream = sys.stdout.isatty() and not as_json and not compare
    streamed = []

    def show(piece: str) -> None:
        streamed.append(piece)
        sys.stdout.write(render.printable(piece))  # a model's ESC never drives the terminal
        sys.stdout.flush()

    with _trusting(trust_remote_code):
        result = run_generate(model, prompt, adapters=adapter, use=use, compare=compare, no_adapter=no_adapter,
                              system=system, sampling=Sampling(temperature, top_p, seed),
                              max_new_tokens=max_new_tokens, on_text=show if stream else None)
    if as_json:
        _print_json(result)
    elif streamed:
        typer.echo("")
    else:
        _out(render.generate_lines(result))


@app.command()
def blend(
    adapter: List[str] = typer.Option(..., "--adapter", metavar="NAME=DIR",
                                      help="A source adapter (repeat it; one alone can only be scaled, with linear)."),
    weights: str = typer.Option(..., "--weights", metavar="W1,W2,...", help="One weight per --adapter, in order."),
    output: Path = typer.Option(..., "--output", help="Directory for the blended adapter."),
    method: str = typer.Option("linear", "--method", help="linear | cat | ties | dare_linear | svd (see docs/adapters.md)."),
    density: Optional[float] = typer.Option(None, "--density", help="ties / dare_linear: fraction of each update kept."),
    seed: int = typer.Option(0, "--seed", help="dare_linear drops values at random: the seed makes it repeatable."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Combine LoRA adapters of one base into a new adapter (peft's add_weighted_adapter)."""
    from lorafit.commands.blend import blend as run_blend

    with _trusting(trust_remote_code):
        result = run_blend(adapter, weights, output, method=method, density=density, seed=seed, overwrite=overwrite)
    _emit(result, render.blend_lines, as_json)


@app.command()
def predict(
    adapter_dir: Path = typer.Argument(..., help="Adapter directory or run directory."),
    data: Path = typer.Option(..., "--data", help="Rows to predict (.jsonl/.json/.csv/.parquet), in the run's data format."),
    output: Path = typer.Option(..., "--output", help="JSONL file to write: one prediction per row, in input order."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Rows per forward pass."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Generation tasks: tokens per answer."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Predict every row of a file with base + adapter: a class, a tag per word, or generated text."""
    from lorafit.commands.predict import predict as run_predict

    with _trusting(trust_remote_code):
        report = run_predict(adapter_dir, data, output, batch_size=batch_size, max_new_tokens=max_new_tokens)
    _emit(report, render.predict_lines, as_json)


@app.command()
def export(
    run_or_adapter: Path = typer.Argument(..., help="Run directory or adapter directory."),
    to: str = typer.Option(..., "--to", help="vllm | gguf | ollama."),
    output: Path = typer.Option(..., "--output", help="Directory to write the export to."),
    name: Optional[str] = typer.Option(None, "--name", help="The served model's name (default: the run's directory name)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="gguf/ollama: f16 (default) | q8_0 | q4_k_m."),
    verify: bool = typer.Option(False, "--verify", help="gguf/ollama: answer the run's held-out prompts in llama.cpp "
                                                        "and compare with lorafit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Export an adapter for vLLM, llama.cpp (GGUF) or Ollama, checked against that server's rules first."""
    from lorafit.commands.export import export as run_export

    with _trusting(trust_remote_code):
        report = run_export(run_or_adapter, to, output, name=name, quant=quant, verify=verify, overwrite=overwrite)
    _emit(report, render.export_lines, as_json)
    if verify and not report.get("verify", {}).get("passed", True):
        raise typer.Exit(1)


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    grid: Optional[List[str]] = typer.Option(
        None, "--grid", metavar="KEY=V1,V2,...",
        help="Values of a recipe key, each read as --set reads it; commas inside brackets stay in the value "
             "('lora.target_modules=[q_proj,v_proj],all-linear'). Keys that vary together: "
             "lora.r,lora.alpha=8,16;16,32. Repeat for more keys: every combination is a point."),
    range_: Optional[List[str]] = typer.Option(
        None, "--range", metavar="KEY=LO:HI[:log|int]", help="A numeric interval, for --search random or tpe."),
    search: str = typer.Option("grid", "--search", help="grid (every combination) | random | tpe (Optuna)."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="random / tpe: points to train in all."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1,
                                            help="Step budget of every point (training.max_steps)."),
    metric: Optional[str] = typer.Option(
        None, "--metric", help="What ranks the points: eval_loss, eval_perplexity or a task metric (exact_match, "
                               "accuracy, macro_f1, entity_f1, ...). Default: the task's headline metric, else eval_loss."),
    tolerance: float = typer.Option(0.01, "--tolerance",
                                    help="Recommend the smallest point within this fraction of the best metric."),
    apply: bool = typer.Option(False, "--apply", help="Write the recommended recipe beside the original "
                                                      "(NAME.recommended.yaml)."),
    parallel: int = typer.Option(1, "--parallel", min=1, help="Points trained at once, one per GPU (CUDA only)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP + " Applies to every point."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Train every point again (and start a new study)."),
    as_json: bool = typer.Option(False, "--json", help="Print sweep.json as one JSON document."),
) -> None:
    """Train short runs over a grid or a search space and rank them: a table (OUTPUT/sweep/sweep.md, .csv, .png,
    .json) and the smallest point within a tolerance of the best. A re-run skips finished points and resumes
    interrupted ones; Ctrl-C stops with the table so far."""
    from lorafit.commands.sweep import exit_code, sweep as run_sweep

    doc = run_sweep(recipe, list(set_ or []), list(grid or []), list(range_ or []), search=search, trials=trials,
                    max_steps=max_steps, metric=metric, tolerance=tolerance, apply=apply, parallel=parallel,
                    overwrite=overwrite)
    _emit(doc, render.sweep_lines, as_json)
    code = exit_code(doc)
    if code == 1:
        typer.echo("error: no point of the sweep finished; their errors are in the table", err=True)
    if code:
        raise typer.Exit(code)


@app.command()
def schema() -> None:
    """Print the recipe's JSON Schema (for editors)."""
    from lorafit.recipe import recipe_schema

    _print_json(recipe_schema())


@app.command()
def serve(
    model: Optional[str] = typer.Argument(
        None, help="Run dir or adapter dir (served under its directory name), or a model (served alone)."),
    adapter: Optional[List[str]] = typer.Option(
        None, "--adapter", metavar="NAME=DIR", help="An adapter (or run) dir served as NAME (repeatable; one base)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: any free one)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="LORAFIT_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on /v1 requests."),
    max_loaded: int = typer.Option(8, "--max-loaded", min=1,
                                   help="Adapters kept in memory at once; the least recently used is evicted."),
    max_batch: int = typer.Option(16, "--max-batch", min=1,
                                  help="Requests decoded together, whatever their adapters (1: one at a time)."),
    allow_runtime_adapters: bool = typer.Option(
        False, "--allow-runtime-adapters", help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter."),
    adapter_root: Optional[Path] = typer.Option(
        None, "--adapter-root", help="With --allow-runtime-adapters: the only folder adapters may be loaded from."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Serve a base and its adapters behind an OpenAI-compatible API; each request names its adapter."""
    from lorafit.commands.serve import serve as run_serve

    with _trusting(trust_remote_code):
        result = run_serve(model, adapters=adapter, host=host, port=port, api_key=api_key, max_loaded=max_loaded,
                           max_batch=max_batch, allow_runtime_adapters=allow_runtime_adapters,
                           adapter_root=adapter_root, trust_remote_code=trust_remote_code,
                           on_ready=lambda info: _out(render.serve_banner(info)))
    _out(render.serve_lines(result))


def _optional_resume_value(argv: list[str]) -> list[str]:
    """`--resume` may stand alone (latest checkpoint): click options can't take an optional value."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        # Alone when nothing, an option or the recipe follows (a checkpoint is a directory, never .yaml).
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")
                                  or argv[i + 1].endswith((".yaml", ".yml"))):
            out.append("latest")
    return out


def main() -> None:
    from lorafit.core import libs
    from lorafit.core.distributed import first_to_report, is_main_process, rank_label

    libs.prepare()  # before any library loads: their chatter off, bitsandbytes' hub-kernel look-up offline
    debug = os.environ.get("LORAFIT_DEBUG") == "1" or "--debug" in sys.argv
    try:
        code = app(args=_optional_resume_value(sys.argv[1:]), prog_name="lorafit", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(n) raised in a command comes back as a return value
            sys.exit(code)
    except LorafitError as e:
        if debug:
            import traceback

            traceback.print_exc()
        problems = e.problems if isinstance(e, RecipeError) else [str(e)]
        if first_to_report(problems):  # under torchrun: once, whichever ranks meet it, and never swallowed
            for line in problems:
                typer.echo(f"error: {rank_label()}{line}", err=True)
        sys.exit(e.exit_code)
    except TrainingInterrupted as e:
        if is_main_process():
            import signal

            typer.echo(f"interrupted ({signal.Signals(e.signum).name}): {render.interrupted_training(e)}", err=True)
            if e.checkpoint and e.resume_command:
                typer.echo(f"resume with: {e.resume_command}", err=True)
        sys.exit(e.exit_code)
    except EvaluationInterrupted as e:  # train's final evaluation: the adapter is saved already
        if is_main_process():
            import signal

            typer.echo(f"interrupted ({signal.Signals(e.signum).name}) during the final evaluation: "
                       f"{render.interrupted_evaluation(e.run_dir)}", err=True)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except _click_usage_errors() as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # bare `lorafit`: the help text
        else:
            command = e.ctx.command_path if getattr(e, "ctx", None) else "lorafit"
            typer.echo(f"error: {e.format_message().rstrip('.')}; see '{command} --help'", err=True)
        sys.exit(2)
    except Exception as e:  # an internal failure: ours, not the user's
        if debug:
            raise
        typer.echo(f"error: internal failure: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


def _click_usage_errors():
    # Typer vendors its own click in recent releases; accept both.
    import click

    errors = [click.UsageError]
    try:
        from typer._click import exceptions as vendored

        errors.append(vendored.UsageError)
    except ImportError:
        pass
    return tuple(errors)


if __name__ == "__main__":
    main()
