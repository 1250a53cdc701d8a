"""User mistakes: each exits 2 with one `error:` message on stderr that says where and how to fix it.

Every case runs the CLI in-process (mostly `lorafit validate`, which runs every check that needs no
training; a few through `lorafit train`), all up front in the ``results`` fixture; --debug's traceback
runs as a real process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, write_jsonl, write_recipe

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ALPACA = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."} for i in range(8)]


@dataclass
class World:
    root: Path
    llama: Path
    bert: Path
    alpaca: Path
    written: list = None  # what the cases wrote under root (the results fixture fills it in)

    def recipe(self, name: str, **sections) -> Path:
        """A good recipe on tiny llama + alpaca rows, with *sections* merged in (None deletes a key)."""
        doc = {
            "model": {"name": str(self.llama)},
            "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
            "data": {"train": str(self.alpaca), "format": "alpaca", "max_length": 256},
            "training": {"max_steps": 2, "batch_size": 2, "grad_accum": 1},
            "output": {"dir": str(self.root / f"run-{name}")},
        }
        for section, values in sections.items():
            for key, value in values.items():
                if value is None:
                    doc[section].pop(key, None)
                else:
                    doc.setdefault(section, {})[key] = value
        return write_recipe(self.root / f"{name}.yaml", doc)

    def data(self, name: str, content: bytes | list) -> Path:
        path = self.root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            write_jsonl(path, content)
        return path

    def model_without(self, name: str, *missing_suffixes: str) -> Path:
        out = self.root / name
        out.mkdir()
        for f in self.llama.iterdir():
            if not f.name.endswith(missing_suffixes):
                shutil.copy(f, out / f.name)
        return out


# Each case: (args of `lorafit`, substrings the error must contain: where it is, what is wrong, the fix).
def cases(w: World) -> dict:
    malformed = w.data("malformed.jsonl", json.dumps(ALPACA[0]).encode() + b"\n" + json.dumps(ALPACA[1]).encode()
                       + b'\n{"instruction": "x", "output": \n' + json.dumps(ALPACA[2]).encode() + b"\n")
    latin1 = w.data("latin1.jsonl", json.dumps(ALPACA[0]).encode() + b"\n"
                    + b'{"instruction": "caf\xe9", "input": "", "output": "ok"}\n')
    empty = w.data("empty.jsonl", b"")
    renamed = w.data("renamed.jsonl", [{"instruction": r["instruction"], "input": "", "answer": r["output"]}
                                       for r in ALPACA])
    long_prompts = w.data("long.jsonl", [{"prompt": "one two three four five six seven eight nine ten " * 4,
                                          "completion": "yes"} for _ in range(4)])
    no_assistant = w.data("no-assistant.jsonl", [{"messages": [{"role": "user", "content": "Hello?"}]}] * 3)
    bad_yaml = w.root / "bad-syntax.yaml"
    bad_yaml.write_text(f"model:\n  name: {w.llama}\ndata:\n  train: {w.alpaca}: oops\n  format: alpaca\n")
    a_list = w.root / "a-list.yaml"
    a_list.write_text("- model\n- data\n")
    no_tokenizer = w.model_without("no-tokenizer", "tokenizer.json", "tokenizer_config.json", ".jinja")
    no_weights = w.model_without("no-weights", ".safetensors")
    fresh = w.root / "fresh-run"
    good = w.recipe("good")

    v = "validate"
    return {
        "unknown recipe key": ([v, w.recipe("alpah", lora={"alpah": 16})], ["lora.alpah", "did you mean 'alpha'?"]),
        "bad enum value": ([v, w.recipe("enum", data={"format": "alpacca"})], ["data.format", "'alpacca'",
                                                                               "did you mean 'alpaca'?"]),
        "rank zero": ([v, w.recipe("r0", lora={"r": 0})], ["lora.r", "must be ≥ 1", "16 is a good default"]),
        "dropout out of range": ([v, w.recipe("dropout", lora={"dropout": 1.5})], ["lora.dropout", "[0, 1)"]),
        "eval_fraction too large": ([v, w.recipe("frac", data={"eval_fraction": 0.9})],
                                    ["data.eval_fraction", "[0, 0.5]", "0.1 holds out 10 %"]),
        "evaluation prompt past the context": ([v, w.recipe("longprompt", evaluation={"prompts": ["word " * 600]})],
                                               ["evaluation.prompts[0]", "above the context", "(512 tokens",
                                                "shorten it to at most 448 tokens"]),
        "several mistakes at once": ([v, w.recipe("many", lora={"r": 0, "dropout": 1.5})],
                                     ["lora.r", "lora.dropout"]),
        "YAML syntax error": ([v, bad_yaml], [f"{bad_yaml}:4", "invalid YAML", "mapping values", "quot"]),
        "recipe is not a mapping": ([v, a_list], [str(a_list), "a recipe is a mapping of sections", "model:"]),
        "recipe file missing": ([v, w.root / "nope.yaml"], [str(w.root / "nope.yaml"), "not found", ".yaml"]),
        "missing data.train": ([v, w.recipe("notrain", data={"train": None})], ["data.train", "required", "add it", ".jsonl"]),
        "data file not found": ([v, w.recipe("nofile", data={"train": str(w.root / "nope.jsonl")})],
                                ["data.train", "file not found", "nope.jsonl", ".jsonl, .json, .csv or .parquet"]),
        "malformed JSONL line": ([v, w.recipe("malformed", data={"train": str(malformed)})],
                                 [f"{malformed}:3", "invalid JSON", "one complete JSON object"]),
        "non-UTF-8 bytes": ([v, w.recipe("latin1", data={"train": str(latin1)})],
                            [f"{latin1}:2", "UTF-8", "0xe9", "iconv"]),
        "empty data file": ([v, w.recipe("empty", data={"train": str(empty)})],
                            [str(empty), "empty", "add training examples"]),
        "missing column": ([v, w.recipe("column", data={"train": str(renamed)})],
                           [f"{renamed}:1", "missing column 'output'", "instruction, input, answer",
                            "data.columns.output"]),
        "target module that does not exist": ([v, w.recipe("target", lora={"target_modules": ["q_proj", "qq_proj"]})],
                                              ["lora.target_modules", "'qq_proj'", "q_proj, k_proj, v_proj, o_proj",
                                               "gate_proj, up_proj, down_proj"]),
        "unknown target preset": ([v, w.recipe("preset", lora={"target_modules": "all_linear"})],
                                  ["lora.target_modules", "all-linear"]),
        "model dir missing": ([v, w.recipe("nomodel", model={"name": str(w.root / "no-such-model")})],
                              ["model.name", "no-such-model", "not found", "check the path"]),
        "model without tokenizer files": ([v, w.recipe("notok", model={"name": str(no_tokenizer)})],
                                          ["model.name", "no tokenizer files", "tokenizer.save_pretrained"]),
        "model with config but no weights": ([v, w.recipe("noweights", model={"name": str(no_weights)})],
                                             ["model.name", "no weights", "complete model directory"]),
        "seq_cls with format alpaca": ([v, w.recipe("seqcls", model={"name": str(w.bert), "task": "seq_cls"})],
                                       ["data.format", "seq_cls", "'classification'"]),
        "--set unknown key": ([v, good, "--set", "lora.alpah=8"], ["--set lora.alpah", "did you mean 'alpha'?"]),
        "--set without '='": ([v, good, "--set", "lora.r8"], ["--set", "lora.r8", "KEY=VALUE", "--set lora.r=8"]),
        "--set wrong type": ([v, good, "--set", "training.max_steps=ten"],
                             ["training.max_steps", "integer", "'ten'"]),
        "every prompt longer than max_length": (
            [v, w.recipe("long", data={"train": str(long_prompts), "format": "completion", "max_length": 8})],
            [str(long_prompts), "nothing to train on", "data.max_length=8", "raise data.max_length"]),
        "chat rows without an assistant turn": ([v, w.recipe("chat", data={"train": str(no_assistant),
                                                                          "format": "chat"})],
                                                [f"{no_assistant}:1", "no assistant turn", "assistant"]),
        # through `lorafit train`
        "train: resume with no checkpoint": (["train", good, "--output-dir", fresh, "--resume"],
                                             ["--resume", "no checkpoint", "train without --resume"]),
        "train: target module that does not exist": (
            ["train", w.recipe("t-target", lora={"target_modules": ["qq_proj"]})],
            ["lora.target_modules", "'qq_proj'", "q_proj"]),
        "train: unknown recipe key": (["train", w.recipe("t-alpah", lora={"alpah": 16})],
                                      ["lora.alpah", "did you mean 'alpha'?"]),
    }


# Known gaps in code this suite does not own: the test runs and must fail until the gap is fixed.
XFAIL: dict[str, str] = {}  # case name → reason, for a known gap (strict)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, tiny_bert_cls) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    return World(root, tiny_llama, tiny_bert_cls, write_jsonl(root / "alpaca.jsonl", ALPACA))


@pytest.fixture(scope="module")
def results(world):
    table = cases(world)
    before = set(world.root.rglob("*"))
    procs = {name: run_cli(*args, env=ENV) for name, (args, _) in table.items()}
    world.written = sorted(str(p) for p in set(world.root.rglob("*")) - before)
    return {name: (table[name][1], procs[name]) for name in table}


def test_no_mistake_wrote_anything(results, world):
    # A failed check leaves no run dir (CONTRACT): not even recipe.yaml in a fresh one.
    assert world.written == [], f"refused commands wrote: {world.written}"


CASE_NAMES = [
    "unknown recipe key", "bad enum value", "rank zero", "dropout out of range", "eval_fraction too large",
    "several mistakes at once", "YAML syntax error", "recipe is not a mapping", "recipe file missing",
    "missing data.train", "data file not found", "malformed JSONL line", "non-UTF-8 bytes", "empty data file",
    "missing column", "target module that does not exist", "unknown target preset", "model dir missing",
    "model without tokenizer files", "model with config but no weights", "seq_cls with format alpaca",
    "--set unknown key", "--set without '='", "--set wrong type", "every prompt longer than max_length",
    "evaluation prompt past the context",
    "chat rows without an assistant turn", "train: resume with no checkpoint",
    "train: target module that does not exist", "train: unknown recipe key",
]


def test_the_case_list_is_complete(results):
    assert sorted(results) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n])) if n in XFAIL else n for n in CASE_NAMES
])
def test_user_mistake_is_one_clear_error(results, world, name):
    expected, proc = results[name]
    report = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, report
    assert proc.stderr.startswith("error:"), report
    assert "Traceback" not in proc.stderr, report
    errors = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    for text in expected:
        assert text in errors, f"{text!r} not in the error:\n{report}"
    # A fix, not only a diagnosis: each message goes on after the problem ("; did you mean", "; give ...").
    first = errors.splitlines()[0]
    assert any(mark in first for mark in ("; ", "(", "e.g.")), f"no hint in: {first}"
    assert proc.stdout == "", "a failed command printed results"
    if name.startswith("train:"):
        assert not list(world.root.glob("run-*/adapter")), "a failed train left an adapter"


def _run_debug(args, env_debug: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, **ENV}
    env.pop("LORAFIT_DEBUG", None)
    if env_debug:
        env["LORAFIT_DEBUG"] = "1"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


@pytest.mark.parametrize("how", ["--debug", "LORAFIT_DEBUG=1"])
def test_debug_shows_the_traceback_of_a_user_mistake(world, how):
    recipe = world.recipe(f"debug-{how[:3]}", lora={"alpah": 16})
    args = ["-m", "lorafit", *(["--debug"] if how == "--debug" else []), "validate", str(recipe)]
    proc = _run_debug(args, env_debug=how != "--debug")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" in proc.stderr and "RecipeError" in proc.stderr
    assert "error: " in proc.stderr and "did you mean 'alpha'?" in proc.stderr


def _broken_install(*cli_args) -> list[str]:
    # A broken installation (a module of lorafit that cannot be imported) is our failure, not the user's.
    code = ("import sys; sys.modules['lorafit.pipeline'] = None; "
            f"sys.argv = ['lorafit', *{list(cli_args)!r}]; from lorafit.cli import main; main()")
    return ["-c", code]


def test_internal_failure_exits_1_without_traceback(world):
    proc = _run_debug(_broken_install("validate", str(world.recipe("internal"))), env_debug=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: internal failure"), proc.stderr
    assert "--debug" in proc.stderr and "Traceback" not in proc.stderr


def test_internal_failure_with_debug_shows_the_traceback(world):
    proc = _run_debug(_broken_install("--debug", "validate", str(world.recipe("internal-debug"))), env_debug=False)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "lorafit.pipeline" in proc.stderr
