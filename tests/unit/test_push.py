"""lorafit.commands.push: what is uploaded, the card, and the one call made to huggingface_hub (faked at HfApi)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from lorafit import render
from lorafit.commands import push
from lorafit.errors import LorafitError

TOKEN = "hf_secretTOKEN1234567890"


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory):
    from tests.unit.test_merge import make_adapter

    run = tmp_path_factory.mktemp("push") / "run"
    make_adapter(tiny_llama, run / "adapter")
    (run / "adapter" / "README.md").write_text("peft's boilerplate card")
    recipe = {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "task": "causal_lm"},
              "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": "all-linear"},
              "data": {"train": "/home/alice/private/train.jsonl", "format": "alpaca", "max_length": 256},
              "training": {"epochs": 1, "batch_size": 2, "grad_accum": 1, "learning_rate": 2e-4,
                           "lr_scheduler": "cosine", "optim": "paged_adamw_8bit"},
              "output": {"dir": "runs/x", "license": "apache-2.0"}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "metrics.json").write_text(json.dumps({"eval": {"base_eval_loss": 3.21, "eval_loss": 1.23}, "note": "x"}))
    return run


@pytest.fixture(scope="module")
def hub_run_dir(run_dir, tmp_path_factory):
    """The same run, as trained on a hub model (adapter_config names the hub id)."""
    run = tmp_path_factory.mktemp("push") / "hub-run"
    shutil.copytree(run_dir, run)
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg_path.write_text(json.dumps(cfg))
    return run


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_dry_run_lists_files_and_card_without_network(hub_run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi", None)  # any hub use would fail
    lines = render.push_lines(push.push(hub_run_dir, repo_id="alice/tiny-qlora", private=True, dry_run=True))
    text = "\n".join(lines)
    assert "private repo alice/tiny-qlora" in text and "token: found" in text
    listed = [ln.split()[0] for ln in lines if ln.startswith("  ")]
    assert listed == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    card = text.split("--- README.md ---\n", 1)[1]
    meta = _front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"lorafit", "lora", "qlora", "peft"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    assert "datasets" not in meta  # a local file is no hub dataset
    assert "AutoPeftModelForCausalLM.from_pretrained(\"alice/tiny-qlora\")" in card
    assert "4-bit (nf4" in card and "| eval.eval_loss | 1.23 |" in card and "| eval.base_eval_loss | 3.21 |" in card
    assert "/home/alice" not in card and "train.jsonl" in card
    assert TOKEN not in text


def test_push_makes_one_commit_with_the_card(run_dir, monkeypatch, capsys):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def create_branch(self, repo_id, **kw):
            calls.append(("create_branch", repo_id, kw))

        def create_commit(self, repo_id, operations, **kw):
            calls.append(("create_commit", repo_id, operations, kw))
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    lines = render.push_lines(push.push(run_dir / "adapter", repo_id="alice/tiny-qlora", private=True, revision="v1"))
    assert calls[0] == ("init", TOKEN)
    assert calls[1] == ("create_repo", "alice/tiny-qlora", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[2][0] == "create_branch" and calls[2][2]["branch"] == "v1"
    _, repo, ops, kw = calls[3]
    assert repo == "alice/tiny-qlora" and kw["revision"] == "v1"
    assert [op.path_in_repo for op in ops] == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    card = ops[-1].path_or_fileobj.decode()
    assert "peft's boilerplate" not in card and _front_matter(card)["library_name"] == "peft"
    out = "\n".join(lines) + capsys.readouterr().err
    assert "alice/tiny-qlora@v1" in out and TOKEN not in out


def test_push_merged_model_dir_card(tiny_llama, run_dir, tmp_path, monkeypatch):
    from lorafit.commands import merge

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "merged"
    merge.merge(run_dir, out, dtype="float32", verify=True)
    lines = render.push_lines(push.push(out, repo_id="alice/tiny-merged", dry_run=True))
    text = "\n".join(lines)
    assert "token: none found" in text
    assert "merge_report.json" in text and "local paths removed" in text
    meta = _front_matter(text.split("--- README.md ---\n", 1)[1])
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]
    assert "base_model" not in meta  # the base is a local directory here: no fake hub id
    # The run trained on a 4-bit base: the card's merge check reports the gap to that quantized model.
    merge_check = text.split("## Merge check", 1)[1]
    assert "the merged model's logits differ" in merge_check and "passed" in merge_check
    assert "trained on a 4-bit base" in merge_check
    # --merged on an adapter merges in a temporary dir first (and says so)
    lines = render.push_lines(push.push(run_dir, repo_id="alice/tiny-merged", merged=True, dry_run=True))
    assert "merged (bfloat16) into a temporary directory and verified" in lines[0]
    assert any(ln.strip().startswith("model.safetensors") for ln in lines)


def test_push_refusals(run_dir, tmp_path, monkeypatch):
    with pytest.raises(LorafitError, match="OWNER/NAME"):
        push.push(run_dir, repo_id="not a repo", dry_run=True)
    with pytest.raises(LorafitError, match="neither an adapter"):
        push.push(tmp_path, repo_id="alice/x", dry_run=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(LorafitError, match="no Hugging Face token"):
        push.push(run_dir, repo_id="alice/x")


def test_hub_errors_never_show_the_token(run_dir, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    class Refusing:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, **kw):
            response = type("Response", (), {"status_code": 401, "headers": {}, "request": None})()
            raise HfHubHTTPError(f"401 Unauthorized for token {self.token}", response=response)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi", Refusing)
    with pytest.raises(LorafitError) as info:
        push.push(run_dir, repo_id="alice/x")
    assert "refused the token" in str(info.value) and TOKEN not in str(info.value)
