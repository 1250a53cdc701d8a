"""A fresh clone installs the versions the suite passes with: constraints.txt pins every package, satisfies
pyproject's ranges, is what `make install` uses, and is what is installed here."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line.strip())
        assert m, f"constraints.txt: not an exact pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + [r for group in extras.values() for r in group]]


def test_every_dependency_is_pinned_within_its_range_and_bounded():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt (make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
        assert any(spec.operator in ("<", "<=", "==", "~=") for spec in req.specifier), \
            f"{req}: no upper bound (the next major release is untested)"


def test_make_install_uses_the_constraints_and_reinstalls_when_they_change():
    makefile = (REPO / "Makefile").read_text()
    assert "CONSTRAINTS := constraints.txt" in makefile
    target = next(line for line in makefile.splitlines() if line.startswith("$(BIN)/lorafit:"))
    assert "$(CONSTRAINTS)" in target
    assert re.search(r"pip install [^\n]*-c \$\(CONSTRAINTS\)[^\n]*-e \"\.\[dev,export,lmeval\]\"", makefile)
    assert "\nlock:" in makefile  # the one way to move them forward


def test_the_installed_versions_are_the_pinned_ones():
    wrong = []
    for name, pinned in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a platform-only package (pinned where it installs)
        if Version(installed).public != Version(pinned).public:
            wrong.append(f"{name} {installed} (pinned {pinned})")
    assert not wrong, "installed versions differ from constraints.txt (run make install): " + ", ".join(wrong)
