"""Safe by default (issue 25): loading someone else's run dir runs no code of its base unless this command says
--trust-remote-code; merge reads safetensors at the run's pinned revision (--low-memory too); push uploads no
local path, no local recipe and nothing a symlink points to outside the directory; generate's output is shown
without terminal control sequences."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli, run_cli_process, write_jsonl

TINY = REPO / "examples" / "tiny-llama"

REMOTE_CODE = '''
from transformers import LlamaConfig, LlamaForCausalLM

with open({marker!r}, "a") as f:  # the proof that this file ran
    f.write("ran\\n")


class RemoteConfig(LlamaConfig):
    pass


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
'''


@pytest.fixture(scope="module")
def remote_run(tmp_path_factory):
    """A run dir whose recipe says model.trust_remote_code: true, on a base that ships code (auto_map): the code
    leaves a marker file when it runs."""
    from tests.unit.test_merge import make_adapter

    root = tmp_path_factory.mktemp("remote")
    base = root / "base"
    shutil.copytree(TINY, base)
    marker = root / "code-ran"
    (base / "custom.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.RemoteConfig", "AutoModelForCausalLM": "custom.RemoteForCausalLM"}
    (base / "config.json").write_text(json.dumps(config))
    run = root / "run"
    make_adapter(TINY, run / "adapter")
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))
    rows = write_jsonl(root / "rows.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 4)
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(base), "trust_remote_code": True},
        "data": {"train": str(rows), "format": "alpaca", "max_length": 128},
        "output": {"dir": str(run)}}))
    return {"root": root, "run": run, "marker": marker, "rows": rows}


COMMANDS = {
    "generate": ["generate", "{run}", "--prompt", "Say hi.", "--max-new-tokens", "2"],
    "evaluate": ["evaluate", "{run}", "--data", "{rows}"],
    "predict": ["predict", "{run}", "--data", "{rows}", "--output", "{root}/pred.jsonl"],
    "merge": ["merge", "{run}", "--output", "{root}/merged"],
    "blend": ["blend", "--adapter", "a={run}", "--adapter", "b={run}", "--weights", "0.5,0.5", "--output", "{root}/bl"],
    "push --merged": ["push", "{run}", "--repo-id", "alice/x", "--merged", "--dry-run"],
    "export": ["export", "{run}", "--to", "vllm", "--output", "{root}/vllm"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_run_dir_runs_no_code_of_its_base_unless_asked(remote_run, command):
    args = [a.format(**{k: str(v) for k, v in remote_run.items()}) for a in COMMANDS[command]]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--trust-remote-code" in error[0] and "recipe.yaml" in error[0], proc.stderr
    assert not remote_run["marker"].exists(), f"{command} ran the base's code"


def test_serve_runs_no_code_of_its_base_unless_asked(remote_run):
    proc = run_cli_process("serve", remote_run["run"], "--port", "0", timeout=120)
    assert proc.returncode == 2 and "--trust-remote-code" in proc.stderr, proc.stderr
    assert not remote_run["marker"].exists()


def test_trust_remote_code_on_the_command_runs_it_and_says_so(remote_run):
    proc = run_cli("generate", remote_run["run"], "--prompt", "Say hi.", "--max-new-tokens", "2", "--trust-remote-code")
    assert proc.returncode == 0, proc.stderr
    assert remote_run["marker"].exists()
    assert "will run on this machine" in proc.stderr and str(remote_run["root"] / "base") in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------------------------
# merge: safetensors only, at the run's pinned revision


def _cache_repo(repo: str, revisions: dict[str, Path], main: str) -> None:
    """A model repo in the hub cache with several snapshots (commit → files), refs/main pointing at *main*."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    for commit, source in revisions.items():
        shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(main)


def test_merge_reads_the_pinned_revision_and_safetensors_only(tmp_path, monkeypatch):
    import huggingface_hub
    import torch
    from safetensors.torch import load_file, save_file

    from tests.unit.test_merge import make_adapter

    pinned, newer = "a" * 40, "b" * 40
    changed = tmp_path / "newer"
    shutil.copytree(TINY, changed)
    weights = load_file(str(changed / "model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(changed / "model.safetensors"),
              metadata={"format": "pt"})
    repo = "acme/tiny-pinned"
    _cache_repo(repo, {pinned: TINY, newer: changed}, main=newer)
    run = tmp_path / "run"
    make_adapter(TINY, run / "adapter")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    config.update(base_model_name_or_path=repo, revision=pinned)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": repo, "revision": pinned},
                                                     "data": {"train": "x.jsonl", "format": "alpaca"},
                                                     "output": {"dir": str(run)}}))
    asked = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: asked.append(k) or real(*a, **k))
    proc = run_cli("merge", run, "--output", tmp_path / "merged", "--low-memory", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert asked and all(k.get("revision") == pinned for k in asked), asked
    assert not any(p.endswith((".bin", ".pt", ".pth")) for k in asked for p in k.get("allow_patterns") or ()), asked
    merged = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    original = load_file(str(TINY / "model.safetensors"))
    torch.testing.assert_close(merged["model.norm.weight"], original["model.norm.weight"])  # not the newer zeros


# ----------------------------------------------------------------------------------------------
# push: nothing of this machine leaves it


def test_push_uploads_no_local_path_no_recipe_and_no_outside_symlink(memorised_adapters, tmp_path):
    from lorafit.commands import push
    from lorafit.commands.blend import blend
    from lorafit.errors import LorafitError

    blended = tmp_path / "blended"
    blend([f"a={memorised_adapters / 'a'}", f"b={memorised_adapters / 'b'}"], "0.5,0.5", blended)
    upload = push.plan_upload(blended, "alice/blend", merged=False, tmp=tmp_path / "scratch")
    for rel, item in {**upload.files, "README.md": upload.card.encode()}.items():
        text = (item if isinstance(item, bytes) else item.read_bytes()).decode("utf-8", errors="replace")
        for local in (str(memorised_adapters), str(tmp_path), str(REPO), str(Path.home()) + "/"):
            assert local not in text, f"{rel} names {local}"
    record = json.loads(upload.files["lorafit-blend.json"])
    assert "recipe" not in record and [s["dir"] for s in record["sources"]] == ["adapter", "adapter"]

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the hub")
    (blended / "notes.txt").symlink_to(secret)
    with pytest.raises(LorafitError) as refused:
        push.plan_upload(blended, "alice/blend", merged=False, tmp=tmp_path / "scratch2")
    assert "notes.txt" in str(refused.value) and "outside" in str(refused.value)


# ----------------------------------------------------------------------------------------------
# generate: what a model writes never drives the terminal


def test_generate_output_is_shown_without_control_sequences():
    from lorafit import render

    text = "Sure.\x1b[2J\x1b]0;owned\x07 Done.\nNext line\r"
    one = render.generate_lines({"answers": [{"adapter": "a", "text": text, "stopped": "end"}], "text": text})
    many = render.generate_lines({"answers": [{"adapter": "a", "text": text, "stopped": "end", "new_tokens": 3},
                                              {"adapter": None, "text": text, "stopped": "end", "new_tokens": 3,
                                               "prompt_as": "a"}], "text": text})
    for lines in (one, many):
        shown = "\n".join(lines)
        assert "\x1b" not in shown and "\x07" not in shown and "\r" not in shown, shown
        assert "Sure." in shown and "Done." in shown and "Next line" in shown
