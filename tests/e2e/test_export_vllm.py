"""`lorafit export --to vllm`: every rule vLLM refuses an adapter by is refused here first (exit 2, one error line
with the fix), on real peft adapters of tiny models; the rank rule; the clean copy and the exact serve line;
a GGUF base named by its hub id. vLLM itself needs a GPU: the gpu-marked test serves the export there."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lorafit.export.vllm import MAX_LORA_RANKS, max_lora_rank
from tests.conftest import REPO, run_cli, write_recipe

BASE = REPO / "examples" / "tiny-llama"


def make_adapter(base: Path, out: Path, *, task_type: str = "CAUSAL_LM", targets="all-linear", r: int = 4,
                 **lora_kwargs) -> Path:
    """A plain-peft adapter of *base* (lora_B non-zero), as made outside lorafit."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorafit.core import tasks

    torch.manual_seed(0)
    task = next(t for t in tasks.TASKS.values() if t.peft_task_type == task_type)
    model = tasks.auto_model_class(task.name).from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                  task_type=task_type, **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    made = {"plain": make_adapter(BASE, root / "plain"),
            "r48": make_adapter(BASE, root / "r48", r=48),
            "dora": make_adapter(BASE, root / "dora", use_dora=True),
            "bias": make_adapter(BASE, root / "bias", bias="all"),
            "save": make_adapter(BASE, root / "save", modules_to_save=["lm_head"]),
            "head": make_adapter(BASE, root / "head", targets=["q_proj", "lm_head"]),
            "phi3": make_adapter(tiny_models("phi3"), root / "phi3"),
            "gpt2": make_adapter(tiny_models("gpt2"), root / "gpt2", targets=["c_attn"], fan_in_fan_out=True),
            "cls": make_adapter(tiny_models("llama", "seq_cls"), root / "cls", task_type="SEQ_CLS")}
    # An adapter whose saved tokenizer carries another chat template than its base (as lorafit saves one
    # trained with data.chat_template).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
    made["template"] = make_adapter(BASE, root / "template")
    tok.save_pretrained(made["template"])
    return made


def _export(adapter: Path, out: Path, *extra) -> tuple[int, str, str]:
    proc = run_cli("export", adapter, "--to", "vllm", "--output", out, *extra)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("kind, says", [
    ("dora", "a DoRA adapter (use_dora)"),
    ("bias", "trains biases (bias: all)"),
    ("save", "trains lm_head in full (modules_to_save)"),
    ("head", "LoRA on lm_head: vLLM's LlamaForCausalLM adapts only q_proj, k_proj"),
    ("gpt2", "vLLM serves GPT2LMHeadModel without LoRA support"),
    ("cls", "a seq_cls adapter: vLLM serves LoRA adapters of text-generating (causal_lm) models only"),
])
def test_each_refusal_is_one_error_line_with_the_fix_and_writes_nothing(adapters, tmp_path, kind, says):
    code, out, err = _export(adapters[kind], tmp_path / "new" / "out")  # not even --output's parent is made
    assert code == 2 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    fix = "serve it with `lorafit serve`" if kind == "cls" else "lorafit merge ADAPTER --output DIR"
    assert fix in lines[0]
    assert not list(tmp_path.iterdir())


def test_the_rank_rule_is_vllms_table():
    assert [max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 48, 64, 300, 320, 321, 512)] == \
        [1, 8, 8, 16, 16, 32, 64, 64, 320, 320, 512, 512]
    assert max_lora_rank(513) is None and MAX_LORA_RANKS[-1] == 512


def test_rank_48_needs_max_lora_rank_64_and_the_copy_is_clean(adapters, tmp_path):
    code, out, err = _export(adapters["r48"], tmp_path / "out", "--name", "dates", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["r"], report["max_lora_rank"]) == (48, 64)
    written = tmp_path / "out" / "adapter"
    config = json.loads((written / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["modules_to_save"], config["use_dora"]) == (48, 96, None, False)
    assert (written / "adapter_model.safetensors").read_bytes() == \
        (adapters["r48"] / "adapter_model.safetensors").read_bytes()
    assert not (written / "tokenizer.json").exists()  # the vocabulary is the base's: vLLM uses the base's
    argv = shlex.split(report["command"])
    assert argv[:3] == ["vllm", "serve", str(BASE)]
    assert argv[argv.index("--max-lora-rank") + 1] == "64" and "--enable-lora" in argv
    assert argv[argv.index("--lora-modules") + 1] == f"dates={(tmp_path / 'out').resolve() / 'adapter'}"
    assert "--chat-template" not in argv  # the adapter's template is the base's
    modules = json.loads(shlex.split(report["lora_modules_json"])[1])
    assert modules == {"name": "dates", "path": str((tmp_path / "out").resolve() / "adapter"),
                       "base_model_name": str(BASE)}
    # peft still loads the clean copy: the export is a plain adapter.
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(written)).r == 48


def test_fused_phi3_modules_are_taken_as_they_are(adapters, tmp_path):
    code, out, err = _export(adapters["phi3"], tmp_path / "out", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["architecture"] == "Phi3ForCausalLM"
    assert report["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_a_chat_template_other_than_the_bases_is_written_and_passed(adapters, tmp_path):
    code, out, err = _export(adapters["template"], tmp_path / "out")
    assert code == 0, err
    template = tmp_path / "out" / "chat_template.jinja"
    assert template.read_text().startswith("{% for m in messages %}{{ m['role'] + ': '")
    serve = next(line.strip() for line in out.splitlines() if line.strip().startswith("vllm serve"))
    argv = shlex.split(serve)
    assert argv[argv.index("--chat-template") + 1] == str(template.resolve())


def test_an_existing_output_needs_overwrite(adapters, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code, _, err = _export(adapters["plain"], tmp_path / "out")
    assert code == 2 and "--overwrite" in err and (tmp_path / "out" / "keep.txt").exists()
    code, _, err = _export(adapters["plain"], tmp_path / "out", "--overwrite")
    assert code == 0, err
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "adapter").is_dir()


def test_options_of_the_gguf_targets_are_refused_for_vllm(adapters, tmp_path):
    code, _, err = _export(adapters["plain"], tmp_path / "out", "--quant", "q8_0")
    assert code == 2 and err.startswith("error: --quant:")
    code, _, err = _export(adapters["plain"], tmp_path / "out", "--verify")
    assert code == 2 and err.startswith("error: --verify:")


def test_a_gguf_base_is_served_by_its_hub_id_and_the_command_says_so(tiny_llama, tmp_path, monkeypatch):
    from tests.unit.test_gguf_convert import write_tiny_gguf

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "cache"))
    gguf_file = write_tiny_gguf(tiny_llama, tmp_path / "tiny.Q8_0.gguf", kind="q8_0")
    run = tmp_path / "run"
    make_adapter(tiny_llama, run / "adapter")
    config_path = run / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "someone/tiny-llama"  # what lorafit records for model.base_id
    config_path.write_text(json.dumps(config))
    (run / "train.jsonl").write_text('{"text": "hello"}\n')
    write_recipe(run / "recipe.yaml", {"model": {"name": str(gguf_file), "base_id": "someone/tiny-llama"},
                                       "data": {"train": str(run / "train.jsonl"), "format": "text"}})
    code, out, err = _export(run, tmp_path / "out", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["base"] == "someone/tiny-llama" and report["name"] == "run"
    assert shlex.split(report["command"])[2] == "someone/tiny-llama"
    assert any("tiny.Q8_0.gguf dequantized" in n and "original weights of someone/tiny-llama" in n
               for n in report["notes"])
    assert any("data.format text" in n and "/v1/completions" in n for n in report["notes"])


@pytest.mark.gpu
def test_vllm_serves_the_export_and_answers_as_lorafit_generate(adapters, tmp_path):
    """On a GPU machine with vLLM installed: the exported adapter, loaded by vLLM as the printed command says,
    answers greedily what `lorafit generate` answers with base + adapter."""
    vllm = pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest

    from lorafit.commands.generate import generate

    base = REPO / "examples" / "tiny-llama"
    code, out, err = _export(adapters["plain"], tmp_path / "out", "--json")
    assert code == 0, err
    report = json.loads(out)
    prompts = ["What is the capital of France?", "Name a colour.", "Count to five."]
    want = [generate(adapters["plain"], p, max_new_tokens=16)["text"] for p in prompts]
    llm = vllm.LLM(model=str(base), enable_lora=True, max_lora_rank=report["max_lora_rank"], dtype="float32",
                   enforce_eager=True, gpu_memory_utilization=0.2)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    outs = llm.generate(texts, vllm.SamplingParams(temperature=0, max_tokens=16, stop_token_ids=report["stop_token_ids"]),
                        lora_request=LoRARequest(report["name"], 1, str(tmp_path / "out" / "adapter")))
    assert [o.outputs[0].text.strip() for o in outs] == want
