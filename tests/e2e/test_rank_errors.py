"""Several processes (issue 25): a user's mistake met by any rank is printed once and never swallowed; a GGUF file
is dequantized once per node, however many processes (ranks, or two runs) ask for it at the same moment.

The processes are real `python -m lorafit` / `python -c` children of this test, started as torchrun starts its
workers on one node: the same parent, RANK / LOCAL_RANK / WORLD_SIZE set."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, write_jsonl, write_recipe
from tests.unit.test_gguf_convert import write_tiny_gguf


def rank_env(rank: int, run_id: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LORAFIT_DEBUG"}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TORCHELASTIC_RUN_ID=run_id,
               **extra)
    return env


def start(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank_errors")
    write_jsonl(root / "rows.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 4)
    body = {"model": {"name": str(REPO / "examples" / "tiny-llama")}, "data": {"format": "alpaca", "max_length": 256},
            "output": {"dir": str(root / "run")}}
    # A mistake found before anything heavy loads (the processes start in a second or two).
    bad = write_recipe(root / "bad.yaml", {**body, "lora": {"rr": 4}, "data": {**body["data"], "train": str(root / "rows.jsonl")}})
    return {"root": root, "bad": bad}


def test_a_mistake_every_rank_meets_is_said_once(recipes):
    run_id = uuid.uuid4().hex
    procs = [start(["-m", "lorafit", "validate", recipes["bad"]], rank_env(rank, run_id)) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    lines = [line for _, err in outs for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "lora.rr" in lines[0], outs


def test_a_mistake_only_one_rank_meets_is_never_silent(recipes):
    """Rank 1 alone meets it (rank 0 is elsewhere, e.g. still loading): it used to exit 2 without a word."""
    proc = start(["-m", "lorafit", "validate", recipes["bad"]], rank_env(1, uuid.uuid4().hex))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "rank 1" in lines[0] and "lora.rr" in lines[0], err


CONVERT = """
import os, sys, time
from pathlib import Path
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.05)
from lorafit.core.gguf import materialize_gguf
from lorafit.recipe import ModelSpec
print(materialize_gguf(ModelSpec(name=sys.argv[1])).name)
"""


def test_a_gguf_is_dequantized_once_however_many_processes_ask(tiny_llama, tmp_path):
    gguf = write_tiny_gguf(tiny_llama, tmp_path / "tiny.gguf")
    go = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k != "LORAFIT_DEBUG"}
    env["LORAFIT_CACHE"] = str(tmp_path / "cache")
    # Two runs on one node (each alone, so that each would say that it converts): one converts, the other waits.
    procs = [start(["-c", CONVERT, str(gguf), str(go)], env) for _ in range(2)]
    import time

    time.sleep(3)  # both imported and waiting
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len({out.strip() for out, _ in outs}) == 1, outs
    assert sum("dequantizing" in err for _, err in outs) == 1, [err for _, err in outs]
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == \
        [Path(outs[0][0].strip()).name]
