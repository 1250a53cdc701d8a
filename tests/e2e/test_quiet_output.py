"""lorafit's output is lorafit's own, however it is started: the installed entry point, no HF_*_OFFLINE
variable, a network that cannot reach the hub (this machine's), and a CPU on which bitsandbytes looks a
compiled kernel up on the hub at import (AVX512-BF16: forced here, so that the test holds on every CPU).
The base records a hub id, so peft's vocabulary look-up at each save would run too (core.libs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, write_recipe

ENTRY = Path(sys.executable).parent / "lorafit"
# bitsandbytes decides at import whether the CPU has AVX512-BF16 (then it asks the hub for a kernel): say yes.
FORCE_AVX512BF16 = textwrap.dedent("""
    import importlib.abc, sys

    class _ForceAvx512Bf16(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "bitsandbytes.backends.cpu":  # imported after bitsandbytes.functional, before its ops
                import bitsandbytes.functional as functional
                functional.has_avx512bf16 = lambda: True
            return None

    sys.meta_path.insert(0, _ForceAvx512Bf16())
""")
# Every line lorafit writes on stderr: "word: ..." (data:, lora:, model:, evaluate:, warning:, ...) or a step.
OWN_LINE = re.compile(r"^(?:[a-z][a-z0-9 _()-]*: |step \d+(?:/\d+)?[ :])")


def _env(tmp_path: Path) -> dict:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(FORCE_AVX512BF16)
    env = {k: v for k, v in os.environ.items() if not (k.startswith(("HF_", "TRANSFORMERS_")) and "OFFLINE" in k)}
    env.update(PYTHONPATH=str(shim), HF_HOME=str(tmp_path / "hf"), HOME=str(tmp_path / "home"))
    env.pop("LORAFIT_DEBUG", None)
    return env


def _run(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRY), *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


def _foreign(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not OWN_LINE.match(line)]


@pytest.mark.skipif(not ENTRY.is_file(), reason="needs the installed entry point (make install)")
def test_the_installed_command_prints_only_its_own_lines(tiny_llama, tmp_path):
    env = _env(tmp_path)
    # The shim really forces bitsandbytes' hub look-up, which talks without lorafit's guard.
    probe = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert "gemm_4bit_forward" in probe.stderr, probe.stderr[-2000:]

    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"name": str(tiny_llama), "base_id": "acme/tiny-llama"},  # a hub id: peft would look it up
        "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        "data": {"train": str(REPO / "examples" / "data" / "tiny-alpaca.jsonl"), "format": "alpaca",
                 "eval_fraction": 0.125, "max_length": 256},
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1.0e-3, "logging_steps": 1, "save_steps": 1},
        "evaluation": {"generate_samples": 1, "max_new_tokens": 4},
        "output": {"dir": str(tmp_path / "run")},
    })
    validate = _run(env, "validate", recipe)
    assert validate.returncode == 0, validate.stderr[-3000:]

    train = _run(env, "train", recipe)
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "acme/tiny-llama"
    assert list((tmp_path / "run" / "checkpoints").glob("checkpoint-*")), "no checkpoint was saved"
    generate = _run(env, "generate", tmp_path / "run", "--prompt", "hello", "--max-new-tokens", "3")
    assert generate.returncode == 0, generate.stderr[-3000:]
    for name, proc in (("validate", validate), ("train", train), ("generate", generate)):
        assert not _foreign(proc.stderr), f"{name}: library lines on stderr:\n" + "\n".join(_foreign(proc.stderr))
    assert "step 2/2" in train.stderr  # the filter above reads lorafit's real lines
