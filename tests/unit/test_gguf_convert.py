"""GGUF bases on tiny files written here (gguf's GGUFWriter): strict tensor mapping, the cache's dtype,
its rebuild, `model.name: FILE.gguf`, metadata-only validate, the hub id adapters record.

``write_tiny_gguf`` is shared with tests/e2e/test_gguf_push.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafit.core import models
from lorafit.errors import ModelError
from lorafit.recipe import ModelSpec


def write_tiny_gguf(model_dir: Path, out: Path, *, kind: str = "f16", drop: tuple[str, ...] = (),
                    extra: tuple[str, ...] = (), source_url: str | None = None) -> Path:
    """A llama GGUF of the tiny model in *model_dir*, as llama.cpp's converter lays it out (q/k rows
    permuted, norms in F32). *kind*: f16, f32 or q8_0 (matrices quantized). *drop*: GGUF tensor names
    left out; *extra*: names of additional tensors the model has no place for."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    n_head, n_kv, layers = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    file_type = {"f32": 0, "f16": 1, "q8_0": 7}[kind]

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny llama")
    if source_url:
        writer.add_source_url(source_url)
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config["hidden_size"] // n_head)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)

    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    ids = dict(vocab)
    writer.add_bos_token_id(ids[tok_config["bos_token"]])
    writer.add_eos_token_id(ids[tok_config["eos_token"]])
    writer.add_pad_token_id(ids[tok_config["pad_token"]])
    writer.add_add_bos_token(True)
    writer.add_chat_template(tok_config.get("chat_template") or
                             (model_dir / "chat_template.jinja").read_text())

    def permute(w, heads):  # llama.cpp's q/k row order
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    tensors = {}
    for hf_name, w in load_file(str(model_dir / "model.safetensors")).items():
        stem, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        if hf_name.endswith("q_proj.weight"):
            w = permute(w, n_head)
        elif hf_name.endswith("k_proj.weight"):
            w = permute(w, n_kv)
        tensors[name] = w.astype(np.float32)
    for name in extra:
        tensors[name] = np.ones(config["hidden_size"], dtype=np.float32)
    for name, w in tensors.items():
        if name in drop:
            continue
        if w.ndim == 1 or kind == "f32":
            writer.add_tensor(name, w)
        elif kind == "f16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory) -> Path:
    from lorafit.tools.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tied") / "llama", "llama", tie_word_embeddings=True)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))


def test_every_tensor_maps_and_the_cache_keeps_the_file_dtype(tiny_llama, tmp_path, cache, capsys):
    import torch

    gguf = write_tiny_gguf(tiny_llama, tmp_path / "tiny.F16.gguf", source_url="https://huggingface.co/acme/tiny-llama")
    spec = models.materialize_gguf(ModelSpec(name=str(gguf)))  # model.name: FILE.gguf
    out = Path(spec.name)
    assert out.parent == cache / "gguf" and spec.gguf_file is None
    assert spec.base_id == "acme/tiny-llama"  # from general.source.url
    err = capsys.readouterr().err
    assert f"dequantizing {gguf.name}" in err and "as float16" in err and "LORAFIT_CACHE" in err
    converted, original = _weights(out), _weights(tiny_llama)
    assert set(converted) == set(original)
    assert {t.dtype for t in converted.values()} == {torch.float16}
    for name, w in original.items():  # q/k un-permuted, values only rounded to fp16
        torch.testing.assert_close(converted[name].float(), w.half().float(), rtol=0, atol=0, msg=name)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # Second time: the cache, no announcement; the same spec from folder + gguf_file.
    again = models.materialize_gguf(ModelSpec(name=str(tmp_path), gguf_file=gguf.name))
    assert again.name == spec.name and "dequantizing" not in capsys.readouterr().err


def test_quantized_file_is_cached_in_bfloat16_and_rebuilt_when_deleted(tiny_llama, tmp_path, cache, capsys):
    import shutil

    import torch

    gguf = write_tiny_gguf(tiny_llama, tmp_path / "tiny.Q8_0.gguf", kind="q8_0")
    assert models.gguf_dtype(gguf) == "bfloat16"
    spec = models.materialize_gguf(ModelSpec(name=str(gguf)))
    assert spec.base_id is None  # no hub id in this file's metadata
    weights = _weights(spec.name)
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    err = capsys.readouterr().err
    assert "set model.base_id" in err
    original = _weights(tiny_llama)["model.layers.0.mlp.down_proj.weight"]
    assert (weights["model.layers.0.mlp.down_proj.weight"].float() - original).abs().max() < 0.02  # 8-bit blocks
    shutil.rmtree(spec.name)
    assert models.is_gguf_cache(spec.name)
    assert models.materialize_gguf(ModelSpec(name=str(gguf))).name == spec.name
    assert (Path(spec.name) / "model.safetensors").is_file() and "dequantizing" in capsys.readouterr().err


def test_tied_embeddings_are_no_missing_tensor(tiny_tied, tmp_path, cache):
    gguf = write_tiny_gguf(tiny_tied, tmp_path / "tied.gguf")  # no output.weight: lm_head is embed_tokens
    spec = models.materialize_gguf(ModelSpec(name=str(gguf)))
    config = json.loads((Path(spec.name) / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in _weights(spec.name)


def test_a_model_tensor_missing_from_the_file_is_an_error(tiny_llama, tmp_path, cache):
    gguf = write_tiny_gguf(tiny_llama, tmp_path / "holes.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ModelError) as e:
        models.materialize_gguf(ModelSpec(name=str(gguf)))
    assert e.value.exit_code == 2 and e.value.where == "model.gguf_file"
    assert "model.layers.1.mlp.up_proj.weight" in e.value.message and "not in the file" in e.value.message
    assert not list((cache / "gguf").glob("*")), "nothing cached"


def test_a_file_tensor_the_model_cannot_take_is_an_error(tiny_llama, tmp_path, cache):
    gguf = write_tiny_gguf(tiny_llama, tmp_path / "extra.gguf", extra=("blk.0.attn_q_norm.weight",))
    with pytest.raises(ModelError, match=r"blk\.0\.attn_q_norm\.weight") as e:
        models.materialize_gguf(ModelSpec(name=str(gguf)))
    assert "no place for" in e.value.message and e.value.where == "model.gguf_file"


def test_gguf_names_normalise_once(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert models.gguf_spec(ModelSpec(name=str(f))).model_dump(include={"name", "gguf_file"}) == \
        {"name": str(tmp_path), "gguf_file": "m.gguf"}
    same = ModelSpec(name=str(tmp_path), gguf_file="m.gguf")
    assert models.gguf_spec(same) is same
    assert models.gguf_spec(ModelSpec(name="gpt2")).gguf_file is None
    with pytest.raises(ModelError, match="GGUF file not found"):
        models.gguf_spec(ModelSpec(name=str(tmp_path / "missing.gguf")))


def test_hub_id_from_metadata():
    hub = models.gguf_hub_id
    assert hub({"general.source.url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"}) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub({"general.source.repo_url": "https://huggingface.co/acme/x/tree/main"}) == "acme/x"
    assert hub({"general.name": "acme/x"}) == "acme/x"
    assert hub({"general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2"}) is None
    assert hub({"general.source.url": "https://github.com/acme/x"}) is None
    # The model a fine-tune started from is not this checkpoint.
    assert hub({"general.base_model.0.repo_url": "https://huggingface.co/acme/base"}) is None


def test_validate_reads_gguf_metadata_only(tiny_llama, tmp_path, cache, monkeypatch):
    """validate, estimate and find-targets on a .gguf: config and tokenizer from the metadata; no
    conversion, no weights loaded, nothing written."""
    import transformers

    from lorafit import pipeline
    from lorafit.commands.find_targets import find_targets
    from lorafit.recipe import validate_recipe
    from tests.conftest import REPO

    gguf = write_tiny_gguf(tiny_llama, tmp_path / "tiny.gguf")

    def refuse(*a, **k):
        raise AssertionError("validate loaded weights")

    from transformers import modeling_gguf_pytorch_utils as legacy

    parses = []
    parse = legacy.load_gguf_checkpoint
    monkeypatch.setattr(legacy, "load_gguf_checkpoint", lambda *a, **k: parses.append(a) or parse(*a, **k))
    monkeypatch.setattr(models, "materialize_gguf", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    recipe = validate_recipe({"model": {"name": str(gguf)},
                              "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                              "data": {"train": str(REPO / "examples" / "data" / "tiny-chat.jsonl"), "format": "chat",
                                       "max_length": 64},
                              "output": {"dir": str(tmp_path / "run")}})
    report = pipeline.validate(recipe)
    assert report.model["model_type"] == "llama"
    assert report.plan["trainable"]["adapted_modules"] == 4  # q_proj and v_proj on 2 layers
    assert find_targets(str(gguf), r=4)["presets"]["attention"]["modules"] == 8
    assert not cache.exists() and not (tmp_path / "run").exists()
    assert len(parses) == 1, "config and tokenizer (each asked twice) share one parse of the metadata"


def test_push_base_is_the_hub_id(tmp_path):
    """adapter_hub_base: the recipe's model.base_id wins over a local recorded base; else the GGUF's."""
    import yaml

    from lorafit.core.adapters import find_adapter

    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gguf" / "x-0123456789abcdef"),
                                                             "peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": "/nowhere/x.gguf"}}))
    assert models.adapter_hub_base(find_adapter(tmp_path / "run")) is None
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": "/nowhere/x.gguf",
                                                                            "base_id": "acme/x"}}))
    assert models.adapter_hub_base(find_adapter(tmp_path / "run")) == "acme/x"
