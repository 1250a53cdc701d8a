"""`lorafit merge` and `lorafit push --dry-run` through the real CLI, on adapters made with plain peft."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from tests.conftest import run_cli

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    from tests.unit.test_merge import make_adapter

    return make_adapter(tiny_llama, tmp_path_factory.mktemp("cli") / "peft-adapter")


CORRUPT = textwrap.dedent("""
    import sys, torch
    from transformers import PreTrainedModel
    from lorafit import cli
    save = PreTrainedModel.save_pretrained
    def corrupt(model, out, **kw):  # one weight corrupted between merge and save
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.mul_(3)
        save(model, out, **kw)
    PreTrainedModel.save_pretrained = corrupt
    sys.argv = ["lorafit", *sys.argv[1:]]
    cli.main()
""")


DROP = textwrap.dedent("""
    import sys
    from peft import PeftModel
    from lorafit import cli
    PeftModel.merge_and_unload = lambda self, *a, **k: self.unload()  # the adapter silently dropped: base saved
    sys.argv = ["lorafit", *sys.argv[1:]]
    cli.main()
""")


@pytest.fixture(scope="module")
def merges(adapter, tmp_path_factory):
    """The four heavy CLI runs, side by side (each spends most of its time importing torch and peft)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path_factory.mktemp("merges")
    patched = lambda snippet, name, dtype: lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", snippet, "merge", str(adapter), "--output", str(out / name), "--dtype", dtype,
         "--verify"], capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    jobs = {"a": lambda: run_cli("merge", adapter, "--output", out / "a", "--dtype", "float32", "--verify", env=ENV),
            "b": lambda: run_cli("merge", adapter, "--output", out / "b", "--dtype", "float32", "--low-memory",
                                 "--max-shard-size", "150KB", env=ENV),
            "bad": patched(CORRUPT, "bad", "float32"),
            "dropped": patched(DROP, "dropped", "bfloat16")}
    with ThreadPoolExecutor(4) as pool:
        futures = {k: pool.submit(f) for k, f in jobs.items()}
    return out, {k: f.result() for k, f in futures.items()}


def test_merge_verify_and_low_memory(merges):
    from safetensors.torch import load_file

    tmp_path, results = merges
    res = results["a"]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "passed" in res.stdout and "max |logit diff|" in res.stdout and "perplexity" in res.stdout
    assert "adapter effect: max |logit diff| base+adapter vs base" in res.stdout
    report = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert report["verify"]["max_abs_logit_diff"] < 1e-4 and report["verify"]["merge_error_ratio"] < 1e-4
    res = results["b"]
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = {k: v for p in (tmp_path / "b").glob("model-*.safetensors") for k, v in load_file(p).items()}
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def test_merge_refusals_exit_2(adapter, tiny_gpt2, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for args, needle in [((adapter, "--output", tmp_path / "full"), "not empty"),
                         ((tmp_path / "full", "--output", tmp_path / "o"), "adapter_config.json"),
                         ((adapter, "--output", tmp_path / "o", "--base", tiny_gpt2), "base model")]:
        res = run_cli("merge", *args)
        assert res.returncode == 2, res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and needle in last and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_verify_failure_exits_1(merges):
    tmp_path, results = merges
    res = results["bad"]
    assert res.returncode == 1, res.stderr[-3000:]
    assert "FAILED" in res.stdout
    assert json.loads((tmp_path / "bad" / "merge_report.json").read_text())["verify"]["passed"] is False


def test_dropped_adapter_fails_bf16_verify(merges):
    tmp_path, results = merges
    res = results["dropped"]
    assert res.returncode == 1, res.stderr[-3000:]
    assert "adapter effect: max |logit diff| base+adapter vs base" in res.stdout
    assert "FAILED: " in res.stdout and "adapter's effect is not preserved" in res.stdout
    v = json.loads((tmp_path / "dropped" / "merge_report.json").read_text())["verify"]
    assert v["passed"] is False and abs(v["merge_error_ratio"] - 1) < 0.02


def test_push_dry_run(adapter):
    res = run_cli("push", adapter, "--repo-id", "alice/tiny", "--dry-run", "--private", env={"HF_TOKEN": "hf_abcSECRET"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "private repo alice/tiny" in res.stdout and "adapter_model.safetensors" in res.stdout
    assert "library_name: peft" in res.stdout and "hf_abcSECRET" not in res.stdout + res.stderr
