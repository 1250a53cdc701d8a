"""core.weights: the one safetensors header reader and the one rule for LoRA's tensors."""

from __future__ import annotations

import pytest

from lorafit.core.weights import count_adapted, lora_factor, lora_modules, model_index, read_header, tensor_shapes
from lorafit.errors import ModelError


def _save(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_the_header_reader_agrees_with_safetensors(tmp_path):
    import torch
    from safetensors import safe_open

    path = _save(tmp_path / "m.safetensors", {"b.weight": torch.zeros(3, 2, dtype=torch.bfloat16),
                                              "a.bias": torch.zeros(4), "c.ids": torch.zeros(2, dtype=torch.int64),
                                              "empty": torch.zeros(0)})
    header = read_header(path)
    with safe_open(str(path), "pt") as f:
        assert list(header) == list(f.keys())  # sorted, as safetensors lists them
        for name, t in header.items():
            assert t.shape == tuple(f.get_slice(name).get_shape()) and t.dtype == f.get_slice(name).get_dtype()
    assert tensor_shapes(path)["b.weight"] == (3, 2) and header["c.ids"].dtype == "I64"
    assert model_index(tmp_path)["a.bias"] == (path, (4,), "F32")


def test_a_file_that_is_not_safetensors_names_itself(tmp_path):
    bad = tmp_path / "adapter_model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError) as e:
        read_header(bad)
    assert e.value.where == str(bad)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(ModelError):
        read_header(tmp_path / "short.safetensors")


def test_lora_modules_from_a_header(tmp_path):
    import torch

    p = "base_model.model.model.layers.0."
    path = _save(tmp_path / "adapter_model.safetensors", {
        f"{p}self_attn.q_proj.lora_A.weight": torch.zeros(4, 16), f"{p}self_attn.q_proj.lora_B.weight": torch.zeros(32, 4),
        f"{p}mlp.up_proj.lora_A.weight": torch.zeros(8, 16), f"{p}mlp.up_proj.lora_B.weight": torch.zeros(64, 8),
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 100),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(16, 2),
        "base_model.model.score.modules_to_save.weight": torch.zeros(3, 16),
    })
    modules = lora_modules(read_header(path))
    assert {m.path: m.rank for m in modules.values()} == {"model.layers.0.self_attn.q_proj": 4,
                                                          "model.layers.0.mlp.up_proj": 8, "model.embed_tokens": 2}
    q = modules[f"{p}self_attn.q_proj"]
    assert q.a == (4, 16) and q.b == (32, 4) and not q.embedding
    assert modules["base_model.model.model.embed_tokens"].embedding
    assert lora_factor("x.lora_B.weight") == ("x", "B", False) and lora_factor("x.lora_A.default") is None


def test_live_and_saved_adapters_count_alike(tiny_llama, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path)
    saved = lora_modules(read_header(tmp_path / "adapter_model.safetensors"))
    layers = model.config.num_hidden_layers
    assert count_adapted(peft_model) == len(saved) == 2 * layers
