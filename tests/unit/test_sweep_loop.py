"""The sweep's loop and its points' processes: a point random / TPE samples again while it trains in another slot
waits for it (two `lorafit train` processes never write one run dir), and a point's process is out of the reach
of the terminal's Ctrl-C (the sweep forwards it once)."""

from __future__ import annotations

import os
from types import SimpleNamespace

from lorafit.sweep import loop, runner, space


def test_a_point_sampled_again_while_it_trains_waits_for_it():
    a, b = space.point_for((("lora.r", "8"),)), space.point_for((("lora.r", "16"),))
    source = loop.GridSource(SimpleNamespace(points=[a, a, b]))  # as a study may sample: a, a again, b
    held: list[loop.Job] = []
    assert loop.next_job(source, held, set()).index == 1  # a starts in the first slot
    job = loop.next_job(source, held, {a.name})  # the second slot: a again is held, b starts
    assert job.point == b and [(j.point, j.index) for j in held] == [(a, 2)]
    assert loop.next_job(source, held, {a.name, b.name}) is None  # a still runs: the held one waits
    job = loop.next_job(source, held, {b.name})  # a ended: its second sample starts now (reused when finished)
    assert (job.point, job.index) == (a, 2) and held == []
    assert loop.next_job(source, held, set()) is None


def test_a_point_runs_in_a_process_group_the_terminal_does_not_signal(tmp_path):
    """A terminal's Ctrl-C goes to its foreground process group: the sweep's, not the point's."""
    child = runner.start(1, ["--help"], tmp_path)
    try:
        assert os.getpgid(child.proc.pid) == child.proc.pid != os.getpgrp()
        assert os.getsid(child.proc.pid) != os.getsid(0)
    finally:
        child.proc.wait()
        child.reader.join(timeout=10)
