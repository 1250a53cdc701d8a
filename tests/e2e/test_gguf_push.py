"""A GGUF base through the real CLI, on tiny GGUF files: `model.name: FILE.gguf` trains, the adapter
records the hub id (never a path on this machine), the run reloads its local conversion (rebuilt when
deleted), and nothing `lorafit push` would upload names a local path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, write_recipe
from tests.unit.test_gguf_convert import write_tiny_gguf

HUB = "acme/tiny-llama"


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """Two runs on tiny GGUFs, one cache: 'hub' (its metadata names HUB) and 'local' (it names none)."""
    root = tmp_path_factory.mktemp("gguf-runs")
    env = {"LORAFIT_CACHE": str(root / "cache")}
    out = {"root": root, "env": env, "cache": root / "cache"}
    for name, url in (("hub", f"https://huggingface.co/{HUB}"), ("local", None)):
        gguf = write_tiny_gguf(tiny_llama, root / f"{name}.gguf", source_url=url)
        recipe = write_recipe(root / f"{name}.yaml", {
            "model": {"name": str(gguf)},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(REPO / "examples" / "data" / "tiny-chat.jsonl"), "format": "chat",
                     "max_length": 64, "eval_fraction": 0.1},
            "training": {"max_steps": 2, "batch_size": 2},
            "evaluation": {"max_samples": 2},
            "output": {"dir": str(root / f"run-{name}")},
        })
        trained = run_cli("train", recipe, env=env)
        assert trained.returncode == 0, trained.stderr
        out[name] = root / f"run-{name}"
    return out


def _base(run: Path) -> str | None:
    return json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]


def _local_paths(data: bytes, runs: dict) -> list[str]:
    text = data.decode("utf-8", errors="replace")
    needles = {str(runs["root"]), str(runs["cache"]), str(Path.home()) + "/", "/home/", "/tmp/"}
    return [n for n in needles if n in text]


def test_the_adapter_records_the_hub_id_or_its_local_conversion(runs):
    assert _base(runs["hub"]) == HUB
    local = _base(runs["local"])
    assert Path(local).parent == runs["cache"] / "gguf" and (Path(local) / "model.safetensors").is_file()


def test_the_run_reloads_its_local_base(runs):
    """The recorded hub id is not in the (offline) hub cache: generate and evaluate load the conversion."""
    for args in (("generate", runs["hub"], "--prompt", "Name a colour.", "--max-new-tokens", "4"),
                 ("evaluate", runs["hub"], "--json")):
        proc = run_cli(*args, env=runs["env"])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip()


def test_a_deleted_cache_is_rebuilt_from_the_runs_gguf(runs, tmp_path):
    converted = Path(_base(runs["local"]))
    # Outside its run the adapter has no recipe naming the GGUF: a clear error, exit 2.
    alone = tmp_path / "adapter"
    shutil.copytree(runs["local"] / "adapter", alone)
    shutil.rmtree(converted)
    refused = run_cli("generate", alone, "--prompt", "hi", "--max-new-tokens", "2", env=runs["env"])
    assert refused.returncode == 2 and "deleted" in refused.stderr and "--base" in refused.stderr, refused.stderr
    proc = run_cli("generate", runs["local"], "--prompt", "Name a colour.", "--max-new-tokens", "4", env=runs["env"])
    assert proc.returncode == 0, proc.stderr
    assert "dequantizing local.gguf" in proc.stderr and (converted / "model.safetensors").is_file()


def test_base_generate_and_find_targets_take_a_gguf_file(runs):
    gguf = runs["root"] / "hub.gguf"
    proc = run_cli("generate", gguf, "--prompt", "Name a colour.", "--max-new-tokens", "4", env=runs["env"])
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    proc = run_cli("find-targets", gguf, "--json", env=runs["env"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["presets"]["attention"]["modules"] == 8


@pytest.mark.parametrize("name", ["hub", "local"])
def test_push_uploads_no_local_path(runs, name, tmp_path, monkeypatch):
    from lorafit.commands import push

    monkeypatch.setenv("LORAFIT_CACHE", str(runs["cache"]))
    dry = push.push(runs[name], repo_id="alice/tiny-gguf", dry_run=True)
    upload = push.plan_upload(runs[name], "alice/tiny-gguf", merged=False, tmp=tmp_path)
    assert [f["path"] for f in dry["files"]] == list(upload.files)
    assert "adapter_config.json" in upload.files and "tokenizer_config.json" in upload.files
    for rel, item in upload.files.items():
        data = item if isinstance(item, bytes) else item.read_bytes()
        assert not _local_paths(data, runs), f"{rel} names a local path: {_local_paths(data, runs)}"
    assert not _local_paths(upload.card.encode(), runs)
    config = upload.files["adapter_config.json"]
    config = json.loads(config if isinstance(config, bytes) else config.read_bytes())
    if name == "hub":
        assert config["base_model_name_or_path"] == HUB and f"base_model: {HUB}" in upload.card
    else:  # no hub id known: the base is left out, and the card names the GGUF file by its name only
        assert config["base_model_name_or_path"] is None and "local.gguf" in upload.card
