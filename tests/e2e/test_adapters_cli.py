"""`lorafit generate` with several adapters on one base, and `lorafit blend`, on two tiny adapters trained
to memorise different short answers: 'a' (alpaca rows) always answers "Paris.", 'b' (chat rows, its own
chat template) always answers "Blue."."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import BASE, PROMPTS, SYSTEM, TEMPLATE, run_cli, write_jsonl

ASK = "What is the capital of France?"


@pytest.fixture(scope="module")
def runs(memorised_adapters):
    return memorised_adapters


def _json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compare_each_adapter_answers_its_own_and_stops_by_itself(runs):
    doc = _json(run_cli("generate", "--adapter", f"a={runs / 'a'}", "--adapter", f"b={runs / 'b' / 'adapter'}",
                        "--compare", "--prompt", ASK, "--max-new-tokens", "24", "--json"))
    a, b, base = doc["answers"]
    assert (a["adapter"], b["adapter"], base["adapter"], base["prompt_as"]) == ("a", "b", None, "a")
    # Each adapter, switched on in turn on the one base, gives its own memorised answer and ends it itself
    # (EOS learnt), far before --max-new-tokens.
    assert a["text"] == "Paris." and b["text"] == "Blue.", doc
    assert a["stopped"] == b["stopped"] == "end" and a["new_tokens"] <= 6 and b["new_tokens"] <= 6
    assert base["text"] not in ("Paris.", "Blue.") and base["stopped"] == "max_new_tokens"
    assert base["new_tokens"] == 24
    # Each adapter is asked in its own training format: alpaca for a, b's own chat template (saved with it).
    assert "### Instruction:\n" + ASK in a["rendered_prompt"]
    assert b["rendered_prompt"] == f"<|im_start|>user: {ASK}</s><|im_start|>assistant: "
    assert base["rendered_prompt"] == a["rendered_prompt"]


def test_chat_template_trained_with_is_saved_with_the_adapter(runs):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(runs / "b" / "adapter")).chat_template == TEMPLATE
    assert AutoTokenizer.from_pretrained(str(BASE)).chat_template != TEMPLATE


def test_use_picks_an_adapter_with_a_system_prompt(runs):
    proc = run_cli("generate", "--adapter", f"a={runs / 'a'}", "--adapter", f"b={runs / 'b'}", "--use", "b",
                   "--system", SYSTEM, "--prompt", "Name a colour.", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Blue.\n"  # piped: the plain answer, nothing streamed or decorated


def test_no_adapter_sampling_and_streaming(runs):
    from lorafit.commands.generate import Sampling, answer, generate, load_adapters

    served = load_adapters([("a", runs / "a")])
    model, tok, recipe = served.model, served.tokenizers["a"], served.recipes["a"]
    pieces: list[str] = []
    tuned = answer(model, tok, recipe, ASK, 24, on_text=pieces.append)
    assert tuned["text"] == "Paris." and "".join(pieces).strip() == "Paris."
    with model.disable_adapter():  # what --no-adapter answers with: the base, sampled
        draws = [answer(model, tok, recipe, ASK, 12, sampling=Sampling(1.0, 0.95, seed))["text"] for seed in (1, 1, 2)]
        greedy = answer(model, tok, recipe, ASK, 12)["text"]
    assert draws[0] == draws[1] and draws[0] != draws[2]  # the seed makes a sample repeatable
    assert greedy != "Paris."
    assert generate(runs / "a", ASK, no_adapter=True, max_new_tokens=12)["text"] == greedy


@pytest.mark.parametrize("args, where, reason", [
    (["--use", "c"], "--use", "no adapter is named 'c'"),
    (["--compare", "--use", "a"], "--use", "--compare answers with every adapter"),
    (["--top-p", "0.9"], "--top-p", "greedy decoding (temperature 0) ignores top-p"),
    (["--system", SYSTEM, "--use", "a"], "--system", "adapter 'a' was trained on data.format alpaca"),
])
def test_generate_refusals(runs, args, where, reason):
    proc = run_cli("generate", "--adapter", f"a={runs / 'a'}", "--adapter", f"b={runs / 'b'}", "--prompt", ASK, *args)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {where}: ") and reason in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# blend


def _variant(runs, name: str, *, r: int = 8, targets="all-linear", config: dict | None = None):
    """An adapter of the same base saved straight from get_peft_model (untrained), or a copy of 'a' with
    its adapter_config.json edited."""
    out = runs / "variants" / name
    if out.exists():
        return out
    if config is not None:
        shutil.copytree(runs / "a" / "adapter", out)
        path = out / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(BASE)),
                           LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("method, density", [("linear", None), ("cat", None), ("svd", None), ("ties", 0.5),
                                             ("dare_linear", 0.5)])
def test_blend_equals_peft_add_weighted_adapter(runs, tmp_path, method, density):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorafit.commands.blend import blend

    out = tmp_path / "blend"
    result = blend([f"a={runs / 'a'}", f"b={runs / 'b'}"], "0.7,0.3", out, method=method, density=density, seed=3)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(BASE)), str(runs / "a" / "adapter"),
                                      adapter_name="x")
    model.load_adapter(str(runs / "b" / "adapter"), adapter_name="y")
    torch.manual_seed(3)
    model.add_weighted_adapter(["x", "y"], [0.7, 0.3], "m", combination_type=method, density=density)
    expected = get_peft_model_state_dict(model, adapter_name="m")
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert set(saved) == set(expected) and len(saved) == 28
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    assert result["r"] == (16 if method == "cat" else 8) and result["lora_modules"] == 14
    assert json.loads((out / "adapter_config.json").read_text())["r"] == result["r"]


def test_blend_cli_writes_a_plain_peft_adapter_that_answers(runs, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.commands.generate import generate

    out = tmp_path / "mix"
    proc = run_cli("blend", "--adapter", f"a={runs / 'a'}", "--adapter", f"b={runs / 'b'}", "--weights", "1,0",
                   "--output", out, "--json")
    doc = _json(proc)
    assert doc["method"] == "linear" and doc["weights"] == [1.0, 0.0] and doc["output"] == str(out)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= set(doc["files"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dir left behind
    card = (out / "README.md").read_text()
    assert "`linear`" in card and "| a | " in card and "| b | " in card and "| 1 |" in card and "| 0 |" in card
    # Plain peft loads it; weights 1, 0 reproduce adapter a: its memorised answer.
    tok = AutoTokenizer.from_pretrained(str(out))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(BASE)), str(out)).eval()
    prompt = generate(runs / "a", ASK, max_new_tokens=1)["answers"][0]["rendered_prompt"]
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        new = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id)
    assert tok.decode(new[0, ids.shape[1]:], skip_special_tokens=True).strip() == "Paris."
    # lorafit generate asks it in the format its first source was trained on (alpaca).
    again = generate(out, ASK, max_new_tokens=12)
    assert again["text"] == "Paris." and again["answers"][0]["rendered_prompt"] == prompt
    refused = run_cli("blend", "--adapter", f"a={runs / 'a'}", "--adapter", f"b={runs / 'b'}", "--weights", "1,0",
                      "--output", out)
    assert refused.returncode == 2 and "error: --output: " in refused.stderr and "--overwrite" in refused.stderr


@pytest.mark.parametrize("name, variant, method, where, reason", [
    ("r4", {"r": 4}, "linear", "--adapter c", "linear needs every adapter at one rank"),
    ("qv", {"targets": ["q_proj", "v_proj"]}, "ties", "--adapter c", "ties adds the A and B factors module by module"),
    ("gpt2", {"config": {"base_model_name_or_path": "gpt2"}}, "svd", "--adapter c", "'c' was trained on gpt2"),
    ("cls", {"config": {"task_type": "SEQ_CLS"}}, "cat", "--adapter c", "'c' is a seq_cls adapter"),
])
def test_blend_refusals(runs, tmp_path, name, variant, method, where, reason):
    other = _variant(runs, name, **variant)
    density = ["--density", "0.5"] if method == "ties" else []
    proc = run_cli("blend", "--adapter", f"a={runs / 'a'}", "--adapter", f"c={other}", "--weights", "0.5,0.5",
                   "--method", method, *density, "--output", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {where}: ") and reason in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_blend_other_ranks_and_modules_work_with_cat(runs, tmp_path):
    from lorafit.commands.blend import blend
    from lorafit.errors import LorafitError

    other = _variant(runs, "r4-qv", r=4, targets=["q_proj", "v_proj"])
    result = blend([f"a={runs / 'a'}", f"c={other}"], [0.5, 0.5], tmp_path / "cat", method="cat")
    assert result["r"] == 12 and result["lora_modules"] == 14
    with pytest.raises(LorafitError, match="--density"):
        blend([f"a={runs / 'a'}", f"c={other}"], [0.5, 0.5], tmp_path / "x", method="dare_linear")
    with pytest.raises(LorafitError, match="2 weights for 1 adapters"):
        blend([f"a={runs / 'a'}"], "0.5,0.5", tmp_path / "x")
