"""--overwrite is the one flag for "replace what is there": merge's --force is a hidden alias that says so."""

from __future__ import annotations

from tests.conftest import run_cli


def test_merge_offers_overwrite_and_hides_force():
    help_text = run_cli("merge", "--help").stdout
    assert "--overwrite" in help_text and "--force" not in help_text


def test_force_says_it_is_an_alias_of_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    refused = run_cli("merge", tmp_path / "no-adapter", "--output", out)
    assert refused.returncode == 2 and "--force is an alias" not in refused.stderr
    aliased = run_cli("merge", tmp_path / "no-adapter", "--output", out, "--force")
    assert "warning: --force is an alias of --overwrite" in aliased.stderr
    assert aliased.returncode == 2  # the adapter is missing: the alias changes nothing else
