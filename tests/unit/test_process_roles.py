"""core.distributed is the one place that says which process this is: log, the CLI and the stages ask it."""

from __future__ import annotations

from lorafit import log
from lorafit.core import distributed
from lorafit.recipe import DistributedSpec


def test_rank_0_alone_speaks(monkeypatch, capsys):
    assert distributed.is_main_process() and distributed.world_size() == 1 and distributed.local_rank() == 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not distributed.is_main_process() and distributed.local_rank() == 1 and distributed.world_size() == 2
    log.warn("said once")
    log.info("said once")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    log.warn("said once")
    assert capsys.readouterr().err == "warning: said once\n"


def test_which_strategies_shard_the_weights(monkeypatch):
    assert distributed.sharded_weights(DistributedSpec(strategy="fsdp")) is None  # one process: nothing sharded
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.sharded_weights(DistributedSpec()) is None  # ddp: every rank holds the model
    assert distributed.sharded_weights(DistributedSpec(strategy="deepspeed", zero_stage=2)) is None
    assert "2 processes" in distributed.sharded_weights(DistributedSpec(strategy="fsdp"))
    assert distributed.sharded_weights(DistributedSpec(strategy="deepspeed", zero_stage=3)) is not None


def test_alone_the_flags_are_this_process_own():
    assert distributed.agree(None, True, False) == (True, False)  # no all-reduce, the arguments never read
