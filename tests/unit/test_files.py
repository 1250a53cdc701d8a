"""core.files: results appear whole or not at all, and what was there survives a failed write."""

from __future__ import annotations

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
