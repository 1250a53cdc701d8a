"""The converters kept from llama-cpp-python's sdist: their files under vendor/llama.cpp/, nothing else, and never
a member that would land outside the converters' folder."""

from __future__ import annotations

import io
import tarfile

import pytest

from lorafit.errors import LorafitError
from lorafit.export.llamacpp import extract_converters


def _sdist(path, names: list[str]):
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = f"# {name}\n".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_converters_are_kept_and_nothing_else(tmp_path):
    root = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    archive = _sdist(tmp_path / "sdist.tar.gz", [root + "convert_hf_to_gguf.py", root + "conversion/base.py",
                                                 root + "gguf-py/gguf/__init__.py", root + "src/llama.cpp",
                                                 "llama_cpp_python-0.3.36/setup.py"])
    extract_converters(archive, tmp_path / "out")
    kept = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert kept == ["conversion/base.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert (tmp_path / "out" / "conversion" / "base.py").read_text() == f"# {root}conversion/base.py\n"


def test_a_member_that_climbs_out_is_refused(tmp_path):
    archive = _sdist(tmp_path / "sdist.tar.gz", ["x/vendor/llama.cpp/conversion/../../escaped.py"])
    (tmp_path / "out" / "deep").mkdir(parents=True)
    with pytest.raises(LorafitError, match="unsafe path"):
        extract_converters(archive, tmp_path / "out" / "deep")
    assert not list(tmp_path.rglob("escaped.py"))
