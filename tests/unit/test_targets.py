"""find-targets' counts: published numbers, peft on the meta model, every family of the tiny set."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import pytest

from lorafit.core import targets as T
from lorafit import render
from lorafit.commands import find_targets as targets_report
from lorafit.errors import ModelError
from lorafit.tools.tiny import tiny_config

CONFIGS = Path(__file__).resolve().parent.parent / "data" / "configs"
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL7 = QKVO + ["gate_proj", "up_proj", "down_proj"]
PEFT_TASK = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS"}


def peft_count(meta, keys, task="causal_lm", **kw):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(meta, LoraConfig(target_modules=keys, task_type=PEFT_TASK[task], **kw))
    return model.get_nb_trainable_parameters()


@pytest.mark.parametrize("name, keys, expected", [
    ("llama-3.2-1b", QKVO, 3_407_872),
    ("llama-3.1-8b", QKVO, 13_631_488),
    ("llama-3.1-8b", ALL7, 41_943_040),
])
def test_published_numbers(name, keys, expected):
    meta = T.build_meta_model(T.load_config(str(CONFIGS / name)))
    _, chosen = T.resolve_targets(meta, keys)
    assert T.count_lora_params(chosen, 16) == expected
    assert T.count_trainable(meta, chosen, r=16).trainable == expected
    assert peft_count(meta, keys, r=16)[0] == expected


def test_report_presets_reproduce_published_numbers():
    report = targets_report.find_targets(str(CONFIGS / "llama-3.1-8b"), r=16)
    assert report["presets"]["attention"]["trainable_params"] == 13_631_488
    assert report["presets"]["all-linear"]["trainable_params"] == 41_943_040
    assert report["presets"]["all-linear"]["target_modules"] == ALL7
    small = targets_report.find_targets(str(CONFIGS / "llama-3.2-1b"), r=16)
    att = small["presets"]["attention"]
    assert att["trainable_params"] == 3_407_872 and round(att["percent"], 2) == 0.28
    k = next(g for g in small["modules"] if g["key"] == "k_proj")  # GQA: 8 kv heads × 64
    assert (k["count"], k["in_features"], k["out_features"]) == (16, 2048, 512)
    assert k["lora_params"] == 16 * 16 * (2048 + 512)


# family × task × preset × bias × dora × layers: every combination counted as peft counts it.
CASES = [c for c in itertools.product(
    ["llama", "gpt2", "bert", "gpt_neox", "qwen2"], ["causal_lm", "seq_cls"], ["all-linear", "attention", "mlp"],
    ["none", "all", "lora_only"], [False, True], [None, [1]]) if not (c[0] == "bert" and c[1] == "causal_lm")]


def test_counts_equal_peft_on_meta_model():
    mismatches = []
    for family, task, preset, bias, dora, layers in CASES[::3]:  # a third of the grid keeps this under 10 s
        meta = T.build_meta_model(tiny_config(family, 384), task)
        keys, chosen = T.resolve_targets(meta, preset)
        ours = T.count_trainable(meta, chosen, r=4, bias=bias, use_dora=dora, layers_to_transform=layers, task=task)
        theirs = peft_count(meta, keys, task, r=4, bias=bias, use_dora=dora, layers_to_transform=layers)
        if theirs != (ours.trainable, ours.all_params):
            mismatches.append((family, task, preset, bias, dora, layers, theirs, ours))
    assert not mismatches


@pytest.mark.parametrize("family, task, save", [
    ("llama", "causal_lm", ["embed_tokens"]),
    ("llama", "causal_lm", ["lm_head"]),
    ("bert", "seq_cls", ["pooler.dense"]),
    ("llama", "token_cls", None),
])
def test_modules_to_save_and_task_heads_equal_peft(family, task, save):
    meta = T.build_meta_model(tiny_config(family, 384), task)
    keys, chosen = T.resolve_targets(meta, "attention")
    ours = T.count_trainable(meta, chosen, r=8, modules_to_save=save, task=task)
    assert ours.modules_to_save > 0
    assert peft_count(meta, keys, task, r=8, modules_to_save=save) == (ours.trainable, ours.all_params)


def test_gpt2_conv1d_and_fused_modules(tmp_path):
    tiny_config("gpt2", 384).save_pretrained(tmp_path)  # a directory holding only config.json
    report = targets_report.find_targets(str(tmp_path), r=8)
    attn = next(g for g in report["modules"] if g["key"] == "c_attn")
    assert (attn["kind"], attn["block"], attn["in_features"], attn["out_features"]) == ("fused", "attention", 64, 192)
    c_proj = [g for g in report["modules"] if g["name"].endswith("c_proj")]
    assert {g["key"] for g in c_proj} == {"attn.c_proj", "mlp.c_proj"}  # same leaf, different blocks
    meta = T.build_meta_model(T.load_config(str(tmp_path)))
    preset = report["presets"]["all-linear"]
    assert peft_count(meta, preset["target_modules"], r=8)[0] == preset["trainable_params"]


def test_modules_to_save_candidates_and_tied_embeddings(tmp_path):
    tiny_config("qwen2", 384).save_pretrained(tmp_path)
    report = targets_report.find_targets(str(tmp_path))
    cands = {c["name"]: c for c in report["modules_to_save_candidates"]}
    assert cands["model.embed_tokens"]["kind"] == "embedding" and cands["model.embed_tokens"]["tied"]
    assert cands["lm_head"]["kind"] == "head" and cands["lm_head"]["tied"]
    assert all("lm_head" not in g["name"] and "embed" not in g["name"] for g in report["modules"])


def test_seq_cls_report_counts_the_head(tmp_path):
    tiny_config("bert", 384).save_pretrained(tmp_path)
    report = targets_report.find_targets(str(tmp_path), task="seq_cls", r=4)
    assert report["task_heads"] == ["classifier"]
    assert report["presets"]["attention"]["head_params"] == 64 * 2 + 2


def test_json_document_is_stable():
    report = targets_report.find_targets(str(CONFIGS / "llama-3.2-1b"))
    doc = json.loads(json.dumps(report))
    assert doc["schema_version"] == 1
    assert set(doc) == {"schema_version", "model", "model_type", "architecture", "task", "r", "total_params",
                        "modules", "modules_to_save_candidates", "task_heads", "presets"}
    assert set(doc["modules"][0]) == {"name", "key", "also_matches", "block", "kind", "count", "in_features",
                                      "out_features", "lora_params"}
    assert set(doc["presets"]["mlp"]) == {"target_modules", "modules", "trainable_params", "lora_params",
                                          "head_params", "percent", "yaml"}
    assert doc["total_params"] == 1_235_814_400  # tied embeddings counted once


def test_yaml_snippet_is_a_valid_lora_section():
    import yaml

    from lorafit.recipe import LoraSpec

    report = targets_report.find_targets(str(CONFIGS / "llama-3.2-1b"), r=8)
    section = yaml.safe_load(report["presets"]["mlp"]["yaml"])["lora"]
    spec = LoraSpec.model_validate(section)
    assert spec.r == 8 and spec.target_modules == ["gate_proj", "up_proj", "down_proj"]


def test_render_is_a_table():
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(render.find_targets_table(targets_report.find_targets(str(CONFIGS / "llama-3.2-1b"))))
    text = console.export_text()
    for expected in ("q_proj", "attention", "mlp", "modules_to_save candidates", "3,407,872", "lora:"):
        assert expected in text


def test_layer_index_follows_peft():
    assert T.layer_index("model.layers.3.self_attn.q_proj") == 3
    assert T.layer_index("model.layers.1.mlp.experts.7.w1") == 1
    assert T.layer_index("layers.2.attn.q") is None  # peft needs a named segment before the index


@pytest.mark.parametrize("name, words", [
    ("/nonexistent/model-dir", ["directory not found"]),
    ("nobody-here/not-a-model", ["hub cache"]),
])
def test_unknown_model_names_what_was_looked_for(name, words):
    with pytest.raises(ModelError) as err:
        targets_report.find_targets(name)
    assert all(w in str(err.value) for w in words)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        targets_report.find_targets(str(tmp_path))
