"""lorafit.commands.merge: equality with base+adapter, low-memory == normal, verify, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafit import render
from lorafit.commands import merge
from lorafit.core.weights import tensor_shapes
from lorafit.errors import LorafitError, ModelError


def make_adapter(base: Path, out: Path, *, targets="all-linear", seed: int = 0, b_std: float = 0.2,
                 **lora_kwargs) -> Path:
    """A plain-peft adapter with lora_B ~ N(0, b_std) (non-zero unless b_std is 0), as made outside lorafit."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std) if b_std else p.zero_()
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama, tmp_path_factory):
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("ad") / "llama")


@pytest.fixture(scope="module")
def weak_llama_adapter(tiny_llama, tmp_path_factory):
    # Its effect on the logits (~0.9) is below the bf16 tolerance (15 % of the largest logit, ~1.05).
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("ad") / "weak", b_std=0.01)


@pytest.fixture(scope="module")
def gpt2_adapter(tiny_gpt2, tmp_path_factory):
    # GPT-2's Conv1D stores weights transposed: fan_in_fan_out exercises the other layout.
    return make_adapter(tiny_gpt2, tmp_path_factory.mktemp("ad") / "gpt2", targets=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True, use_rslora=True)


def _logits(model_or_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_or_dir) if isinstance(model_or_dir, Path) else model_or_dir
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _reference(base: Path, adapter: Path, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)), ids)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("low_memory", [False, True])
def test_fp32_merge_equals_base_plus_adapter(family, low_memory, tiny_models, llama_adapter, gpt2_adapter, tmp_path):
    import torch

    base, adapter = (tiny_models("llama"), llama_adapter) if family == "llama" else (tiny_models("gpt2"), gpt2_adapter)
    out = tmp_path / "merged"
    report = merge.merge(adapter, out, dtype="float32", low_memory=low_memory)
    ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    diff = (_logits(out, ids) - _reference(base, adapter, ids)).abs().max().item()
    assert diff < 1e-4
    assert report["lora_modules"] > 0 and "verify" not in report
    # a standard model directory, no LoRA keys, right dtype, tokenizer and generation config
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(report["files"])
    for shard in out.glob("*.safetensors"):
        assert not [k for k in tensor_shapes(shard) if "lora" in k]
    assert not list(tmp_path.glob(".merged.*")), "temporary directory left behind"


def test_low_memory_equals_normal_and_shards(tiny_llama, llama_adapter, tmp_path):
    from safetensors.torch import load_file

    normal = tmp_path / "normal"
    low = tmp_path / "low"
    merge.merge(llama_adapter, normal, dtype="bfloat16", max_shard_size="100KB")
    report = merge.merge(llama_adapter, low, dtype="bfloat16", low_memory=True, max_shard_size="100KB")
    assert "model.safetensors.index.json" in report["files"] and len(list(low.glob("model-*.safetensors"))) > 2
    for shard in low.glob("*.safetensors"):
        assert shard.stat().st_size < 100_000 + 40_000  # a shard overshoots by at most one tensor
    a = {k: v for p in normal.glob("*.safetensors") for k, v in load_file(p).items()}
    b = {k: v for p in low.glob("*.safetensors") for k, v in load_file(p).items()}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == __import__("torch").bfloat16
        # peft rounds ΔW to bf16 before adding it; the stream adds in fp32 and rounds once: 1 bf16 ulp apart at most
        assert (a[k].float() - b[k].float()).abs().max() <= a[k].float().abs().max() * 2 ** -7, k
    index = json.loads((low / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)


def test_verify_passes_and_writes_report(tiny_llama, llama_adapter, tmp_path):
    report = merge.merge(llama_adapter, tmp_path / "out", dtype="bfloat16", verify=True)
    v = report["verify"]
    assert v["passed"] and v["prompt_source"] == "built-in text" and v["quantized"] is None
    assert 0 <= v["max_abs_logit_diff"] <= v["tolerance"]
    assert v["perplexity_adapter"] > 1 and v["perplexity_merged"] > 1 and v["perplexity_base"] > 1
    # The adapter moves logits by ~8.6; bf16 rounding of W + ΔW costs ~5 % of that (limit 50 %).
    assert v["adapter_effect"] > 1 and not v["adapter_effect_negligible"] and v["failures"] == []
    assert v["merge_error_ratio"] == pytest.approx(v["max_abs_logit_diff"] / v["adapter_effect"])
    assert 0 < v["merge_error_ratio"] < 0.15 and v["max_merge_error_ratio"] == 0.5
    saved = json.loads((tmp_path / "out" / merge.REPORT_FILE).read_text())
    assert saved["verify"]["passed"] is True and saved["verify"]["max_abs_logit_diff"] == v["max_abs_logit_diff"]
    assert saved["verify"]["merge_error_ratio"] == v["merge_error_ratio"]
    lines = "\n".join(render.merge_lines(report))
    assert "max |logit diff|" in lines and "perplexity" in lines and "passed" in lines
    assert f"adapter effect: max |logit diff| base+adapter vs base {v['adapter_effect']:.3g}; merge error is " \
           f"{v['merge_error_ratio']:.1%} of it" in lines
    from lorafit.commands.card import build_card

    card = build_card(repo_id="alice/m", kind="merged", base="x", recipe=None, metrics=None, merge_report=report)
    assert f"the merge error is {v['merge_error_ratio']:.1%} of that (limit 50%: passed)" in card


def _drop_the_adapter(monkeypatch):
    """The normal merge saves the base unmerged: peft's unload() strips the LoRA layers without merging."""
    from peft import PeftModel

    monkeypatch.setattr(PeftModel, "merge_and_unload", lambda self, *a, **k: self.unload(), raising=False)


@pytest.mark.parametrize("strength", ["default", "weak"])
def test_verify_fails_when_the_adapter_is_dropped(strength, tiny_llama, llama_adapter, weak_llama_adapter, tmp_path,
                                                  monkeypatch):
    adapter = llama_adapter if strength == "default" else weak_llama_adapter
    _drop_the_adapter(monkeypatch)
    report = merge.merge(adapter, tmp_path / "out", dtype="bfloat16", verify=True)
    v = report["verify"]
    assert v["passed"] is False and v["merge_error_ratio"] == pytest.approx(1.0, abs=0.02)
    assert v["perplexity_merged"] == pytest.approx(v["perplexity_base"])  # the merged model is the base
    assert any("adapter's effect is not preserved" in f for f in v["failures"])
    if strength == "weak":  # the older rules alone would have passed it
        assert v["max_abs_logit_diff"] <= v["tolerance"] and len(v["failures"]) == 1
    assert json.loads((tmp_path / "out" / merge.REPORT_FILE).read_text())["verify"]["passed"] is False
    lines = "\n".join(render.merge_lines(report))
    assert "FAILED: " in lines and "adapter's effect is not preserved: merge error is 100% of it" in lines


def test_push_merged_refuses_a_dropped_adapter(tiny_llama, weak_llama_adapter, monkeypatch):
    from lorafit.commands import push
    from lorafit.errors import LorafitError

    _drop_the_adapter(monkeypatch)
    with pytest.raises(LorafitError, match="nothing pushed"):
        push.push(weak_llama_adapter, repo_id="alice/x", merged=True, dry_run=True)


def test_verify_of_a_zero_adapter_does_not_check_the_ratio(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "zero", b_std=0.0)  # lora_B = 0: the adapter changes nothing
    report = merge.merge(adapter, tmp_path / "out", dtype="bfloat16", verify=True)
    v = report["verify"]
    assert v["passed"] and v["adapter_effect"] == 0 and v["adapter_effect_negligible"]
    assert v["merge_error_ratio"] is None
    assert "within rounding: the adapter changes nothing measurable" in "\n".join(render.merge_lines(report))


def test_verify_fails_on_a_corrupted_weight(tiny_llama, llama_adapter, tmp_path, monkeypatch):
    import torch

    from transformers import PreTrainedModel

    real_save = PreTrainedModel.save_pretrained

    def corrupt_then_save(model, out, **kw):  # one weight corrupted between merge and save
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.add_(0.5)
        real_save(model, out, **kw)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", corrupt_then_save)
    report = merge.merge(llama_adapter, tmp_path / "out", dtype="float32", verify=True)
    v = report["verify"]
    assert not v["passed"] and v["max_abs_logit_diff"] > v["tolerance"]
    assert json.loads((tmp_path / "out" / merge.REPORT_FILE).read_text())["verify"]["passed"] is False
    assert "FAILED" in "\n".join(render.merge_lines(report))


def test_verify_uses_the_runs_eval_data(tiny_llama, llama_adapter, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(llama_adapter, run / "adapter")
    (run / "eval.jsonl").write_text("".join(json.dumps({"instruction": f"Count to {i}", "output": "one two"}) + "\n"
                                            for i in range(6)))
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": str(tiny_llama)},
                                                     "data": {"train": "missing.jsonl", "eval": "eval.jsonl",
                                                              "format": "alpaca"}}))
    report = merge.merge(run, tmp_path / "out", dtype="float32", verify=True)
    assert report["verify"]["prompt_source"] == "eval data eval.jsonl"
    assert report["verify"]["prompts"] == 4 and report["verify"]["passed"]
    assert report["verify"]["merge_error_ratio"] < 1e-4  # fp32: ~2e-6


def test_refusals(tiny_llama, tiny_gpt2, llama_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(LorafitError, match="not empty.*--overwrite"):
        merge.merge(llama_adapter, out)
    with pytest.raises(ModelError, match="adapter_config.json"):
        merge.merge(tmp_path, tmp_path / "o2")
    with pytest.raises(ModelError, match="dtype"):
        merge.merge(llama_adapter, tmp_path / "o3", dtype="int4")
    with pytest.raises(ModelError, match="base model"):
        merge.merge(llama_adapter, tmp_path / "o4", base=str(tiny_gpt2))
    # same architecture, other widths: caught from the checkpoint header, before loading
    from lorafit.tools.tiny import build_tiny_model

    wide = build_tiny_model(tmp_path / "wide", "llama", hidden_size=128, head_dim=32)
    with pytest.raises(ModelError, match=r"64×64.*128×128|128×128.*64×64|expects"):
        merge.merge(llama_adapter, tmp_path / "o5", base=str(wide))
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()
    # --force replaces the contents
    merge.merge(llama_adapter, out, dtype="float32", force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_failed_merge_leaves_nothing(tiny_llama, llama_adapter, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        merge.merge(llama_adapter, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
