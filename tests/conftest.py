"""Session fixtures: tiny real models on disk, offline hub settings, a CLI runner."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

# Offline before anything imports huggingface_hub: hub look-ups would hang for ~40 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_DATASETS_CACHE"] = str(home / "datasets")
    yield home


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Factory: tiny_models('llama'|'gpt2'|'qwen2'|'gpt_neox'|'bert'|'t5'|'bart', task) → model dir, built once."""
    from lorafit.tools.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict = {}

    def get(family: str = "llama", task: str = "causal_lm") -> Path:
        key = (family, task)
        if key not in cache:
            cache[key] = build_tiny_model(root / f"{family}-{task}", family, task)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_models) -> Path:
    return tiny_models("gpt2")


@pytest.fixture(scope="session")
def tiny_bert_cls(tiny_models) -> Path:
    return tiny_models("bert", "seq_cls")


@pytest.fixture(scope="session")
def tiny_t5(tiny_models) -> Path:
    """Encoder-decoder, gated-GELU feed-forward (wi_0, wi_1, wo) as flan-t5."""
    return tiny_models("t5", "seq2seq_lm")


@pytest.fixture(scope="session")
def tiny_bart(tiny_models) -> Path:
    return tiny_models("bart", "seq2seq_lm")


_IN_PROCESS = threading.Lock()


def run_cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the CLI in this process, as `lorafit ARGS` would run: argv, *env* added to the environment, *cwd*;
    returns its exit code, stdout and stderr as a finished subprocess would. No interpreter start and no
    re-import of torch/transformers per call: the suite's default. *timeout* is the subprocess runner's.

    Where the process itself is under test (signals, torchrun, the installed entry point, variables read at
    import such as HF_HOME), use run_cli_process."""
    from lorafit import cli

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _IN_PROCESS:  # one call at a time: stdout, stderr, argv, cwd and the environment are the process's
        saved_env, saved_cwd, saved_argv = os.environ.copy(), os.getcwd(), sys.argv
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        os.environ.pop("LORAFIT_DEBUG", None)
        sys.argv = ["lorafit", *argv]
        try:
            if cwd is not None:
                os.chdir(cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    cli.main()
                except SystemExit as e:
                    if isinstance(e.code, str):
                        err.write(e.code + "\n")
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            os.chdir(saved_cwd)
            sys.argv = saved_argv
            os.environ.clear()
            os.environ.update(saved_env)
            gc.collect()
    return subprocess.CompletedProcess(["lorafit", *argv], code, out.getvalue(), err.getvalue())


def run_cli_process(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (`python -m lorafit`), as a user would."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("LORAFIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lorafit", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def write_jsonl(path: Path, rows) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is present (the device machine); elsewhere they are skipped."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------
# Trained tiny runs, shared by every test that only reads a run

BASE = REPO / "examples" / "tiny-llama"  # the shipped tiny llama (ChatML template)
PROMPTS = ["What is the capital of France?", "Name a colour.", "Count to five.", "What is two plus two?"]
# Not the base's ChatML: proves generate renders with the template saved beside the adapter.
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")
SYSTEM = "You answer briefly."


def _memorise_recipe(data, out, fmt, **data_extra) -> dict:
    return {"model": {"name": str(BASE)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "data": {"train": str(data), "format": fmt, "eval_fraction": 0.0, "max_length": 128, **data_extra},
            "training": {"max_steps": 40, "batch_size": 4, "grad_accum": 1, "learning_rate": 1.0e-2,
                         "logging_steps": 100, "seed": 0},
            "evaluation": {"metrics": False},
            "output": {"dir": str(out)}}


@pytest.fixture(scope="session")
def memorised_adapters(tmp_path_factory):
    """Two run dirs under one root, trained once per session on the shipped tiny llama: 'a' (alpaca rows)
    always answers "Paris.", 'b' (chat rows, its own chat TEMPLATE, SYSTEM on half the rows) always answers
    "Blue.". For every test that reads adapters (generate, blend, serve, export, ...)."""
    from lorafit.pipeline import train
    from lorafit.recipe import validate_recipe

    root = tmp_path_factory.mktemp("adapters")
    alpaca = write_jsonl(root / "a.jsonl", [{"instruction": p, "input": "", "output": "Paris."} for p in PROMPTS])
    chat = write_jsonl(root / "b.jsonl", [
        {"messages": ([{"role": "system", "content": SYSTEM}] if i % 2 else [])
         + [{"role": "user", "content": p}, {"role": "assistant", "content": "Blue."}]}
        for i, p in enumerate(PROMPTS)])
    train(validate_recipe(_memorise_recipe(alpaca, root / "a", "alpaca")))
    train(validate_recipe(_memorise_recipe(chat, root / "b", "chat", chat_template=TEMPLATE)))
    return root
