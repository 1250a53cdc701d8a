"""Hostile and broken inputs (issue 17): each exits 2 with one `error:` line naming the place, no traceback,
and writes nothing. Together with test_bad_inputs.py (29 cases) this is the suite of user mistakes.

Recipes that attack the YAML loader (alias bombs, huge files, deep nesting, code tags), --set values that do
the same, data files and model folders that are wrong in ways a user meets (pickled weights, code to run,
a file for a folder). Every case runs the CLI in-process (a few also as real processes).
A Hugging Face token given by mistake never shows in the output, and a run never writes one to disk.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_cli, run_cli_process, write_jsonl
from tests.e2e.test_bad_inputs import ALPACA, ENV, World

TOKEN = "hf_HostileTestTOKEN0123456789abcdef"  # the shape of a real token; never valid


def _alias_bomb() -> str:
    """The "billion laughs": 9 levels of 9 aliases each, 9^9 strings once expanded."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _flow_bomb() -> str:
    """The same bomb on one line, for --set."""
    parts = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    parts += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "[" + ", ".join(parts) + "]"


def cases(w: World) -> dict:
    def text(name: str, content: str | bytes) -> Path:
        path = w.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def model_dir(name: str, *, drop=(), add: dict | None = None, config: dict | None = None) -> Path:
        out = w.root / name
        out.mkdir()
        for f in w.llama.iterdir():
            if f.name not in drop:
                shutil.copy(f, out / f.name)
        for fname, content in (add or {}).items():
            (out / fname).write_bytes(content)
        if config is not None:
            (out / "config.json").write_text(json.dumps(config))
        return out

    def to_pickle(name: str, weights_name: str) -> Path:
        out = model_dir(name, drop=("model.safetensors",))
        (out / weights_name).write_bytes(b"not read: refused before loading")
        return out

    llama_config = json.loads((w.llama / "config.json").read_text())
    head = f"model: {{name: {w.llama}}}\ndata: {{train: {w.alpaca}, format: alpaca}}\n"
    good = w.recipe("h-good")
    bomb = text("bomb.yaml", head + _alias_bomb())
    big = text("big.yaml", head + "# " + "x" * 50_000_000 + "\n")
    deep = text("deep.yaml", head + "lora: " + "[" * 10_000 + "]" * 10_000 + "\n")
    deep_block = text("deep-block.yaml", head + "".join(" " * i + f"k{i}:\n" for i in range(500)))
    self_ref = text("self-ref.yaml", head + "lora: &l {target_modules: *l}\n")
    many_aliases = text("many-aliases.yaml", head + "x: &x 1\nlora: {layers_to_transform: [" + ", ".join(["*x"] * 200) + "]}\n")
    code_tag = text("code-tag.yaml", head + 'lora: !!python/object/apply:os.system ["touch pwned"]\n')
    bad_date = text("bad-date.yaml", f"model: {{name: 2024-13-45}}\ndata: {{train: {w.alpaca}}}\n")
    nul = text("nul.yaml", head.encode() + b"lora: {r: 4\x00}\n")
    latin1 = text("latin1.yaml", head.encode() + b"output: {run_name: caf\xe9}\n")
    unhashable = text("unhashable.yaml", head + "? [a, b]\n: 1\n")
    two_docs = text("two-docs.yaml", head + "---\nlora: {r: 4}\n")
    model_list = text("model-list.yaml", f"model: [{w.llama}]\ndata: {{train: {w.alpaca}, format: alpaca}}\n")

    chat_rows = w.data("chat-rows.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                         {"role": "assistant", "content": "Hello"}]}] * 4)
    a_list_row = w.data("list-row.jsonl", b'["instruction", "output"]\n')
    number_output = w.data("number.jsonl", [{"instruction": "two plus two", "input": "", "output": 4}] * 4)
    csv_extra = w.data("extra.csv", b"instruction,input,output\nhi,,there,again\n")
    txt = w.data("rows.txt", b"one line\n")

    pickle_bin = to_pickle("pickle-bin", "pytorch_model.bin")
    pickle_pt = to_pickle("pickle-pt", "model.pt")
    remote = model_dir("remote-code", config={**llama_config, "model_type": "mysterymodel",
                                              "auto_map": {"AutoConfig": "configuration_my.MyConfig"}},
                       add={"configuration_my.py": b"open('pwned', 'w')\n"})
    no_config = model_dir("no-config", drop=("config.json",))
    bad_config = model_dir("bad-config", add={"config.json": b"{not json"})
    unknown_type = model_dir("unknown-type", config={**llama_config, "model_type": "no_such_family"})
    weights_file = w.llama / "model.safetensors"

    v = "validate"
    return {
        # the recipe file
        "alias bomb": ([v, bomb], [f"{bomb}:", "refused", "expands to more than", "aliases"]),
        "50 MB recipe": ([v, big], [str(big), "larger than 1 MB", "a recipe is a few KB"]),
        "10,000-deep nesting": ([v, deep], [f"{deep}:", "nested more than 32 levels", "2 to 4 levels"]),
        "500-deep block nesting": ([v, deep_block], [f"{deep_block}:", "nested more than 32 levels"]),
        "alias that contains itself": ([v, self_ref], [f"{self_ref}:", "refers to a value that contains it"]),
        "200 aliases": ([v, many_aliases], [f"{many_aliases}:", "more than 100 aliases"]),
        "python tag in the recipe": ([v, code_tag], [f"{code_tag}:", "invalid YAML", "constructor"]),
        "impossible date": ([v, bad_date], [str(bad_date), "invalid YAML value", "month", "quote the value"]),
        "NUL byte in the recipe": ([v, nul], [str(nul), "invalid YAML"]),
        "recipe not UTF-8": ([v, latin1], [str(latin1), "not valid UTF-8", "save the recipe as UTF-8"]),
        "unhashable key": ([v, unhashable], [f"{unhashable}:", "invalid YAML", "unhashable"]),
        "two YAML documents": ([v, two_docs], [f"{two_docs}:", "invalid YAML", "another document"]),
        "model section is a list": ([v, model_list], ["model", "must be a section"]),
        "recipe is a directory": ([v, w.root], [str(w.root), "recipe file not found", ".yaml"]),
        "infinite lora.alpha": ([v, w.recipe("inf", lora={"alpha": float("inf")})], ["lora.alpha", "finite"]),
        "token in the recipe": ([v, w.recipe("token", output={"run_name": TOKEN})],
                                ["output.run_name", "access token", "HF_TOKEN"]),
        # --set
        "--set alias bomb": ([v, good, "--set", f"lora.target_modules={_flow_bomb()}"],
                             ["--set lora.target_modules", "refused", "expands to more than"]),
        "--set 20,000 characters": ([v, good, "--set", "output.run_name=" + "x" * 20_000],
                                    ["--set output.run_name", "longer than 10,000", "recipe file"]),
        "--set deep nesting": ([v, good, "--set", "lora.target_modules=" + "[" * 200 + "]" * 200],
                               ["--set lora.target_modules", "nested more than 32"]),
        "--set into a value": ([v, good, "--set", "lora.r.x=1"], ["--set lora.r", "not a section"]),
        "--set a token": ([v, good, "--set", f"output.run_name={TOKEN}"], ["output.run_name", "hf_***", "HF_TOKEN"]),
        "--set a token where a number goes": ([v, good, "--set", f"lora.r={TOKEN}"], ["lora.r", "hf_***"]),
        # data files
        "chat rows under data.format alpaca": ([v, w.recipe("chatrows", data={"train": str(chat_rows)})],
                                               [f"{chat_rows}:1", "missing column 'instruction'",
                                                "set data.format: chat"]),
        "data file name misspelt": ([v, w.recipe("misspelt", data={"train": str(w.root / "alpacca.jsonl")})],
                                    ["data.train", "file not found", f"did you mean {w.alpaca}?"]),
        "data.train is a directory": ([v, w.recipe("datadir", data={"train": str(w.root)})],
                                      ["data.train", "is a directory", ".jsonl"]),
        "data file of an unknown type": ([v, w.recipe("txt", data={"train": str(txt)})],
                                         ["data.train", "unsupported file type '.txt'", ".jsonl"]),
        "JSONL row that is a list": ([v, w.recipe("listrow", data={"train": str(a_list_row)})],
                                     [f"{a_list_row}:1", "expected a JSON object", "data.columns"]),
        "number where text goes": ([v, w.recipe("number", data={"train": str(number_output)})],
                                   [f"{number_output}:1", "column 'output' must be a string", "data.columns.output"]),
        "CSV row with more fields than its header": ([v, w.recipe("csv", data={"train": str(csv_extra)})],
                                                     [f"{csv_extra}:2", "more fields than the header", "quote"]),
        "data.eval missing": ([v, w.recipe("noeval", data={"eval": str(w.root / "eval.jsonl")})],
                              ["data.eval", "file not found"]),
        # model folders
        "pickled weights (pytorch_model.bin)": ([v, w.recipe("pkl", model={"name": str(pickle_bin)})],
                                                ["model.name", "pytorch_model.bin", "pickle", "safe_serialization",
                                                 "model.allow_pickle"]),
        "pickled weights (.pt)": ([v, w.recipe("pt", model={"name": str(pickle_pt)})],
                                  ["model.name", "model.pt", "pickle", "model.allow_pickle"]),
        "model that needs its own code": ([v, w.recipe("remote", model={"name": str(remote)})],
                                          ["model.trust_remote_code", "needs its own Python code",
                                           "model.trust_remote_code: true"]),
        "model folder without config.json": ([v, w.recipe("noconfig", model={"name": str(no_config)})],
                                             ["model.name", "has no config.json", "config.json + weights"]),
        "config.json that is not JSON": ([v, w.recipe("badconfig", model={"name": str(bad_config)})],
                                         ["model.name", "config.json cannot be read", "valid JSON"]),
        "unknown model_type": ([v, w.recipe("unknowntype", model={"name": str(unknown_type)})],
                               ["model.name", "no_such_family"]),
        "model.name is a weights file": ([v, w.recipe("wfile", model={"name": str(weights_file)})],
                                         ["model.name", "is a file, not a model directory", "config.json"]),
        "report_to a tracker not installed": ([v, w.recipe("tb", training={"report_to": "tensorboard"})],
                                              ["training.report_to", "tensorboard is not installed",
                                               "pip install tensorboard", "report_to: none"]),
        "find-targets on a missing folder": (["find-targets", w.root / "no-such-dir"], ["MODEL", "not found"]),
        # through `lorafit train`: refused before the run dir exists
        "train: one wrong name in a target list": (
            ["train", w.recipe("t-targets", lora={"target_modules": ["q_proj", "v_prj"]})],
            ["lora.target_modules", "'v_prj'", "q_proj, k_proj, v_proj"]),
        "train: model folder without config.json": (["train", w.recipe("t-noconfig", model={"name": str(no_config)})],
                                                    ["model.name", "has no config.json"]),
        "train: model that needs its own code": (["train", w.recipe("t-remote", model={"name": str(remote)})],
                                                 ["model.trust_remote_code"]),
        "train: pickled weights": (["train", w.recipe("t-pkl", model={"name": str(pickle_bin)})],
                                   ["model.name", "pickle", "model.allow_pickle"]),
        "train: report_to wandb not installed": (["train", w.recipe("t-wandb", training={"report_to": "wandb"})],
                                                 ["training.report_to", "pip install wandb"]),
        "train: alias bomb": (["train", bomb], ["refused"]),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, tiny_bert_cls) -> World:
    root = tmp_path_factory.mktemp("hostile")
    return World(root, tiny_llama, tiny_bert_cls, write_jsonl(root / "alpaca.jsonl", ALPACA))


# A few cases also run as real processes: the exit code as a user meets it.
IN_A_PROCESS = ("alias bomb", "50 MB recipe", "10,000-deep nesting", "train: one wrong name in a target list")
BOMBS = ("alias bomb", "50 MB recipe", "10,000-deep nesting", "--set alias bomb")  # their peak memory is measured


def _peak_mib(call) -> tuple[object, float]:
    """(call(), the peak Python memory it allocated in MiB): what an unbounded loader would blow up."""
    import tracemalloc

    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def results(world):
    table = cases(world)
    before = {p for p in world.root.rglob("*")}
    env = {**ENV, "HF_TOKEN": TOKEN}
    done = {name: _peak_mib(lambda args=args: run_cli(*args, env=env, cwd=world.root)) if name in BOMBS
            else (run_cli(*args, env=env, cwd=world.root), None) for name, (args, _) in table.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        real = pool.map(lambda args: (run_cli_process(*args, env=env, cwd=world.root), None),
                        [table[name][0] for name in IN_A_PROCESS])
        real = dict(zip(IN_A_PROCESS, real))
    written = sorted(str(p) for p in set(world.root.rglob("*")) - before)
    table.update({f"process: {name}": table[name] for name in IN_A_PROCESS})
    done.update({f"process: {name}": real[name] for name in IN_A_PROCESS})
    return {name: (table[name][1], *done[name]) for name in table}, written


def test_there_are_enough_cases(results):
    from tests.e2e.test_bad_inputs import CASE_NAMES

    assert len(results[0]) + len(CASE_NAMES) >= 40


def test_no_case_wrote_anything(results):
    assert results[1] == [], "a refused command wrote files"


def _case_names() -> list[str]:
    # The names, at collection time without building the world: the keys of cases()'s returned dict.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cases))
    ret = next(n for n in ast.walk(tree) if isinstance(n, ast.Return) and isinstance(n.value, ast.Dict))
    names = [k.value for k in ret.value.keys]
    return names + [f"process: {name}" for name in IN_A_PROCESS]


@pytest.mark.parametrize("name", _case_names())
def test_hostile_input_is_one_clear_error(results, world, name):
    expected, proc, _ = results[0][name]
    report = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, report
    assert proc.stderr.startswith("error:"), report
    assert "Traceback" not in proc.stderr, report
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, report
    for text in expected:
        assert text in errors[0], f"{text!r} not in the error:\n{report}"
    assert proc.stdout == "", "a failed command printed results"
    assert TOKEN not in proc.stdout + proc.stderr, "the token was printed"
    assert not list(world.root.rglob("pwned")), "code in an input ran"


def test_hostile_recipes_are_refused_before_they_expand(results):
    # The loader caps stop these before they cost memory (an alias bomb took 20 s and 1 GB): a few MiB, where
    # the expanded bomb alone would be gigabytes. Memory, not seconds: it does not flake on a busy machine.
    big = {n: round(mib) for n, (_, _, mib) in results[0].items() if n in BOMBS and mib > 64}
    assert {n for n in results[0] if n in BOMBS} == set(BOMBS)
    assert not big, big


@pytest.fixture(scope="module")
def token_run(world, tmp_path_factory):
    """One real tiny run, trained with HF_TOKEN set as a user has it."""
    run = tmp_path_factory.mktemp("token") / "run"
    proc = run_cli("train", world.recipe("token-run"), "--output-dir", run, env={**ENV, "HF_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TOKEN not in proc.stdout + proc.stderr
    return run


def test_a_token_never_reaches_the_run_or_its_card(token_run):
    # The run holds no trace of it (recipe.yaml, metrics.json, checkpoints, adapter), nor does push --dry-run's card.
    assert (token_run / "recipe.yaml").is_file() and (token_run / "metrics.json").is_file()
    holding = [str(p) for p in token_run.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert holding == [], f"the token was written to {holding}"
    card = run_cli("push", token_run, "--repo-id", "alice/tiny", "--dry-run", env={**ENV, "HF_TOKEN": TOKEN})
    assert card.returncode == 0, card.stderr
    assert "library_name: peft" in card.stdout and TOKEN not in card.stdout + card.stderr


def test_the_resolved_recipe_holds_an_absolute_output_dir(token_run):
    import yaml

    assert yaml.safe_load((token_run / "recipe.yaml").read_text())["output"]["dir"] == str(token_run)


def test_merge_output_respects_the_umask(token_run, tmp_path):
    # Like the run dir (mkdir): 0755 under the usual umask 022, not mkdtemp's 0700.
    out = tmp_path / "merged"
    proc = run_cli("merge", token_run, "--output", out, "--dtype", "float32", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask == token_run.stat().st_mode & 0o777


def test_evaluate_names_the_data_file(token_run, tmp_path):
    data = write_jsonl(tmp_path / "extra.jsonl", ALPACA[:3])
    proc = run_cli("evaluate", token_run, "--data", data, "--json", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["data"] == str(data) and report["eval_rows"] == 3
    held = json.loads(run_cli("evaluate", token_run, "--json", env=ENV).stdout)
    assert held["data"].startswith("held-out rows of the run")
    missing = run_cli("evaluate", token_run, "--data", tmp_path / "extar.jsonl", env=ENV)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --data: file not found"), missing.stderr


def test_trusting_remote_code_names_the_code_that_runs(tmp_path, capsys):
    from lorafit.core.models import warn_remote_code
    from lorafit.recipe import ModelSpec

    warn_remote_code(ModelSpec(name="owner/model", trust_remote_code=True))
    hub = capsys.readouterr().err
    assert hub.startswith("warning: model.trust_remote_code") and "owner/model" in hub
    assert "main (unpinned)" in hub and "pin model.revision to a commit" in hub
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": {"AutoConfig": "c.C"}}))
    warn_remote_code(ModelSpec(name=str(tmp_path), trust_remote_code=True))
    assert str(tmp_path) in capsys.readouterr().err
    warn_remote_code(ModelSpec(name=str(tmp_path), trust_remote_code=False))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no code of its own
    warn_remote_code(ModelSpec(name=str(tmp_path), trust_remote_code=True))
    assert capsys.readouterr().err == ""


def test_allow_pickle_lets_pickled_weights_through_with_a_warning(world, results):
    # The case "pickled weights (pytorch_model.bin)" made the folder; validate reads no weights.
    recipe = world.recipe("pkl-allowed", model={"name": str(world.root / "pickle-bin"), "allow_pickle": True})
    outcome = run_cli("validate", recipe, cwd=world.root)
    assert outcome.returncode == 0, outcome.stderr
    assert "warning:" in outcome.stderr and "pytorch_model.bin" in outcome.stderr and "weights_only" in outcome.stderr
