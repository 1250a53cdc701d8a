"""README and docs match the code (issue 25, "Quiet and honest output"): the lists they give are the code's
lists, they name no file the repository lacks, and they say one thing where they say it twice."""

from __future__ import annotations

import re
import typing

import yaml

from lorafit.core import memory, tasks
from lorafit.recipe import DataFormat
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = {p.name: p.read_text(encoding="utf-8") for p in (REPO / "docs").glob("*.md")}


def _walkthrough_comment(key: str) -> str:
    block = README.split("## A recipe, walked through", 1)[1].split("```", 2)[1]
    return next(line for line in block.splitlines() if line.strip().startswith(f"{key}:")).split("#", 1)[1]


def test_the_walkthrough_lists_every_task_as_real():
    comment = _walkthrough_comment("task")
    assert [t.strip() for t in comment.split("|")] == list(tasks.TASKS), comment
    assert "schema only" not in README


def test_the_walkthrough_lists_every_data_format():
    comment = _walkthrough_comment("format")
    assert [f.strip() for f in comment.split("|")] == list(typing.get_args(DataFormat)), comment


def test_no_reference_to_files_the_repository_lacks():
    for name in ("LORA.md", "CONTRACT.md"):
        assert name not in README
        for doc, text in DOCS.items():
            assert name not in text, (doc, name)
        for path in (REPO / "lorafit").rglob("*.py"):
            assert name not in path.read_text(encoding="utf-8"), (path, name)
    # estimate's output says where its rule of thumb comes from, in words, not a missing file
    from lorafit.recipe import validate_recipe

    rot = memory.rule_of_thumb(validate_recipe({"model": {"name": "m"}, "data": {"train": "d.jsonl"}}), 7_000_000_000)
    assert ".md" not in rot["source"] and "7B" in rot["source"]


def test_one_demo_time():
    places = {"README.md": README, "recipes/quickstart.yaml": (REPO / "recipes" / "quickstart.yaml").read_text(),
              **{f"docs/{k}": v for k, v in DOCS.items()}}
    said = {(where, m) for where, text in places.items() for m in re.findall(r"~?(\d+) min on 2 idle CPU cores", text)}
    assert said and len({m for _, m in said}) == 1, said


def test_data_md_says_when_a_nan_stops_the_run():
    bullet = DOCS["data.md"].split("- **NaN/inf loss**", 1)[1].split("\n- **", 1)[0]
    assert "training.logging_steps" in bullet and "no adapter" in bullet, bullet


def test_merge_md_says_what_low_memory_does_with_task_heads():
    text = DOCS["merge.md"]
    section = text.split("`--low-memory` needs", 1)[1].split("##", 1)[0]
    assert "head" in section and "score" in section and "normal mode" in section, section


def test_show_example_says_what_n_counts():
    from lorafit import cli

    params = {p.name: p for p in typer_command(cli.app, "validate").params}
    help_text = params["show_example"].help
    assert "held-out" in help_text and "dropped" in help_text, help_text
    assert "before shuffling" not in DOCS["data.md"]


def test_merge_force_is_the_hidden_old_name_of_overwrite():
    from lorafit import cli

    params = {p.name: p for p in typer_command(cli.app, "merge").params}
    assert params["force"].hidden and "--overwrite" in params["force"].help
    assert "non-empty --output" in params["overwrite"].help


def test_a_run_dir_holding_an_adapter_names_fixes_that_work():
    from lorafit.errors import RecipeError
    from lorafit.recipe import OutputSpec
    from lorafit.stages.resume import check_run_dir

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "adapter").mkdir()
        try:
            check_run_dir(OutputSpec(dir=d), resume=None)
        except RecipeError as e:
            fix = e.fix
    # --resume alone is refused on a finished run: the fix says it needs a longer run
    assert "--resume" in fix and "training.max_steps" in fix and "--overwrite" in fix, fix


def test_llama3_qlora_trains_chat_like_its_lora_sibling():
    lora, qlora = (yaml.safe_load((REPO / "recipes" / f"llama3-8b-{k}.yaml").read_text())["data"]
                   for k in ("lora", "qlora"))
    assert qlora["format"] == lora["format"] == "chat" and qlora["train"] == lora["train"]


def typer_command(app, name: str):
    import typer.main

    group = typer.main.get_command(app)
    return group.commands[name]
