"""core.files: results appear whole or not at all, and what was there survives a failed write."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafit.core.files import atomic_dir, atomic_write, atomic_write_bytes, atomic_write_text, replace_dir


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert path.read_text() == "new" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "metrics.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")

    def half(tmp):
        tmp.write_text("half of the n")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_atomic_dir_swaps_a_whole_directory(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".adapter.partial-")
        assert not (out / "new.txt").exists()  # nothing reaches the target before the block ends
        (tmp / "new.txt").write_text("y")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # neither the temporary nor the old one stays


def test_a_failed_atomic_dir_leaves_the_old_directory(tmp_path):
    out = tmp_path / "deep" / "merged"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list((tmp_path / "deep").iterdir()) == []  # no output, no temporary
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(RuntimeError):
        with atomic_dir(out):
            raise RuntimeError("disk full")
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_replace_dir_onto_an_empty_or_missing_target(tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    (new / "f").write_text("1")
    (tmp_path / "out").mkdir()
    replace_dir(new, tmp_path / "out")
    assert (tmp_path / "out" / "f").read_text() == "1" and not new.exists()
    other = tmp_path / "other"
    other.mkdir()
    replace_dir(other, tmp_path / "fresh")
    assert (tmp_path / "fresh").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]


def test_check_output_never_lets_overwrite_remove_a_source_the_cwd_or_home(tmp_path, monkeypatch):
    """A directory written whole replaces what is there with --overwrite: never a source it reads, the working
    directory, the home directory, or a folder above one of them."""
    from lorafit.core.files import check_output
    from lorafit.errors import LorafitError

    source = tmp_path / "runs" / "a" / "adapter"
    source.mkdir(parents=True)
    cwd, home = tmp_path / "work" / "here", tmp_path / "home"
    cwd.mkdir(parents=True)
    home.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    for output, says in [(source, "holds a source"), (tmp_path / "runs", "holds a source"),
                         (Path("."), "working directory"), (Path(".."), "working directory"),
                         (Path("~").expanduser(), "home directory")]:
        with pytest.raises(LorafitError, match=says) as e:
            check_output(output, [source], overwrite=True)
        assert e.value.where == "--output"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(LorafitError, match="not empty.*--overwrite"):
        check_output(tmp_path / "full", [source], overwrite=False)
    check_output(tmp_path / "full", [source], overwrite=True)  # replaced on purpose
    check_output(tmp_path / "runs" / "a-export", [source, None], overwrite=True)  # a sibling is fine
