"""`lorafit validate` on a good recipe, `schema`, `--version`, `--help`: the real CLI in a subprocess."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

import lorafit
from tests.conftest import REPO, run_cli, write_jsonl, write_recipe

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SECTIONS = ["model", "quantization", "lora", "data", "training", "evaluation", "output", "advice"]
# The contract's commands (../shared/CONTRACT.md); every registered command is checked below too.
COMMANDS = ["train", "validate", "find-targets", "estimate", "evaluate", "merge", "push", "generate", "schema",
            "blend", "predict"]


def tree(path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_llama):
    """Two validations of one good recipe (as written, and with --set lora.r=8), run from an empty CWD."""
    root = tmp_path_factory.mktemp("validate")
    data_dir, cwd = root / "data", root / "cwd"
    data_dir.mkdir(), cwd.mkdir()
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."} for i in range(8)]
    write_jsonl(data_dir / "train.jsonl", rows)
    recipe = write_recipe(root / "recipe.yaml", {
        "model": {"name": str(tiny_llama)},
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": "data/train.jsonl", "format": "alpaca", "eval_fraction": 0.125, "max_length": 256},
        "training": {"max_steps": 2},
        "output": {"dir": str(root / "out")},
    })
    before = {"data": tree(data_dir), "model": tree(tiny_llama)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        plain, with_set = pool.map(lambda extra: run_cli("validate", recipe, *extra, cwd=cwd, env=ENV),
                                   [[], ["--set", "lora.r=8"]])
    return {"root": root, "cwd": cwd, "data_dir": data_dir, "model": tiny_llama, "before": before,
            "plain": plain, "with_set": with_set}


def test_validate_good_recipe_prints_the_checks(validated):
    proc = validated["plain"]
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    checks = {line.split()[1]: line for line in lines if line.startswith("ok ")}
    assert {"recipe", "model", "data", "targets"} <= set(checks), proc.stdout
    assert str(validated["model"]) in checks["model"] and "llama" in checks["model"]
    # 8 rows, eval_fraction 0.125: 7 train and 1 held out, found from the recipe's own directory.
    assert "7 train / 1 eval rows" in checks["data"], checks["data"]
    # tiny llama, all-linear: 7 projections × 2 layers; r·(in+out) summed = 2048 per unit of r.
    assert "14 modules" in checks["targets"] and "8,192 LoRA params at r=4" in checks["targets"], checks["targets"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in checks["targets"]


def test_validate_applies_set_overrides(validated):
    proc = validated["with_set"]
    assert proc.returncode == 0, proc.stderr
    assert "16,384 LoRA params at r=8" in proc.stdout, proc.stdout


def test_validate_writes_nothing(validated):
    assert not (validated["root"] / "out").exists(), "validate created the output directory"
    assert list(validated["cwd"].iterdir()) == [], "validate wrote into the working directory"
    assert tree(validated["data_dir"]) == validated["before"]["data"], "validate wrote next to the data"
    assert tree(validated["model"]) == validated["before"]["model"], "validate touched the model directory"


def test_schema_is_json_schema_with_all_sections():
    proc = run_cli("schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert schema["type"] == "object"
    assert list(schema["properties"]) == SECTIONS
    assert set(schema["required"]) == {"model", "data"}
    # Field documentation reaches editors: lora.r's description is in the schema.
    lora = schema["$defs"]["LoraSpec"]["properties"]
    assert "rank" in lora["r"]["description"].lower()
    assert schema["$defs"]["LoraSpec"].get("additionalProperties") is False  # unknown keys are errors


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"lorafit {lorafit.__version__}"


def _registered() -> list[str]:
    from lorafit.cli import app

    return [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]


def test_help_lists_every_command():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert set(COMMANDS) <= set(_registered()), set(COMMANDS) - set(_registered())
    for command in _registered():
        assert command in proc.stdout, f"{command} missing from --help"
    assert "--version" in proc.stdout and "--debug" in proc.stdout


@pytest.mark.parametrize("command", _registered())
def test_every_command_has_help(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"lorafit {command}" in proc.stdout and proc.stderr == ""


def test_train_help_shows_its_options():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--set", "--output-dir", "--resume"):
        assert option in proc.stdout


def test_unknown_command_is_a_usage_error():
    proc = run_cli("trian", cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "trian" in proc.stderr and "--help" in proc.stderr
    assert "Traceback" not in proc.stderr
