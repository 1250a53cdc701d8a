"""The recipe boundary: YAML + --set in, a validated Recipe out, or a RecipeError naming path and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorafit.errors import RecipeError
from lorafit.recipe import (ALPACA_TEMPLATE, MAX_RECIPE_BYTES, Recipe, apply_override, dump_recipe, load_recipe,
                            recipe_schema, redact, resolve_paths, validate_recipe)

MINIMAL = {"model": {"name": "owner/model"}, "data": {"train": "owner/dataset"}}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def minimal(**sections) -> dict:
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def problems(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, source="r.yaml")
    return info.value.problems


# ----------------------------------------------------------------------------------------------
# Defaults and coercion


def test_defaults_are_filled_in(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", "model: {name: owner/model}\ndata: {train: owner/dataset}\n"))
    assert recipe.model.task == "causal_lm" and recipe.model.dtype == "auto"
    assert recipe.quantization.bits is None and recipe.quantization.quant_type == "nf4"
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (16, 32, 0.05)
    assert recipe.lora.target_modules == "all-linear" and recipe.lora.bias == "none"
    assert recipe.data.format == "text" and recipe.data.eval_fraction == 0.1 and recipe.data.max_length == 1024
    assert recipe.data.columns.instruction == "instruction" and recipe.data.prompt_template == ALPACA_TEMPLATE
    assert recipe.training.learning_rate == 2e-4 and recipe.training.max_steps is None
    assert recipe.evaluation.compare_base is True
    # output.dir is recorded absolute (issue 17): the resolved recipe reruns from any directory.
    assert recipe.output.dir == str(Path.cwd() / "runs" / "lorafit-run") and recipe.output.overwrite is False


def test_yaml_1_1_exponent_string_becomes_a_float(tmp_path):
    text = "model: {name: owner/model}\ndata: {train: owner/dataset}\ntraining:\n  learning_rate: 2e-4\n"
    assert yaml.safe_load(text)["training"]["learning_rate"] == "2e-4"  # the premise: PyYAML reads a string
    recipe = load_recipe(write(tmp_path / "r.yaml", text))
    assert recipe.training.learning_rate == pytest.approx(2e-4)
    assert isinstance(recipe.training.learning_rate, float)


def test_empty_recipe_names_the_missing_sections(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", ""))
    text = "\n".join(info.value.problems)
    assert "model: required" in text and "data: required" in text
    assert "a section with keys: name, task" in text


# ----------------------------------------------------------------------------------------------
# --set


@pytest.mark.parametrize("item, path, expected", [
    ("lora.r=8", ("lora", "r"), 8),
    ("lora.alpha=16", ("lora", "alpha"), 16.0),
    ("training.learning_rate=1e-3", ("training", "learning_rate"), 1e-3),
    ("training.learning_rate=0.001", ("training", "learning_rate"), 1e-3),
    ("training.epochs=2", ("training", "epochs"), 2.0),
    ("lora.target_modules=[q_proj, v_proj]", ("lora", "target_modules"), ["q_proj", "v_proj"]),
    ("lora.target_modules=attention", ("lora", "target_modules"), "attention"),
    ("lora.layers_to_transform=[0, 1]", ("lora", "layers_to_transform"), [0, 1]),
    ("model.num_labels=null", ("model", "num_labels"), None),
    ("quantization.bits=4", ("quantization", "bits"), 4),
    ("quantization.bits=null", ("quantization", "bits"), None),
    ("lora.use_rslora=true", ("lora", "use_rslora"), True),
    ("output.overwrite=yes", ("output", "overwrite"), True),
    # str fields keep what looks like a number as the text the user typed
    ("model.name=12345", ("model", "name"), "12345"),
    ("model.revision=2024", ("model", "revision"), "2024"),
    ("output.run_name=007", ("output", "run_name"), "7"),  # YAML reads 007 as the int 7
    ("output.run_name=exp 1", ("output", "run_name"), "exp 1"),
    ("data.columns.text=body", ("data", "columns", "text"), "body"),
    ("output.dir=runs/a=b", ("output", "dir"), "runs/a=b"),  # only the first '=' splits
    ("model.revision=", ("model", "revision"), ""),
])
def test_set_values_are_typed_by_the_schema(item, path, expected):
    raw = minimal()
    apply_override(raw, item)
    value = validate_recipe(raw)
    for part in path:
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_set_creates_sections_and_overrides_the_file(tmp_path):
    recipe = write(tmp_path / "r.yaml", "model: {name: owner/model}\ndata: {train: owner/dataset}\nlora: {r: 16}\n")
    loaded = load_recipe(recipe, ["lora.r=4", "training.max_steps=5", "training.max_steps=7"])
    assert loaded.lora.r == 4  # the override wins over the file
    assert loaded.training.max_steps == 7  # the last --set wins
    assert loaded.lora.alpha == 32  # untouched keys keep their defaults


@pytest.mark.parametrize("item, where, hint", [
    ("lora.alpah=8", "--set lora.alpah", "did you mean 'alpha'?"),
    ("lroa.r=8", "--set lroa", "did you mean 'lora'?"),
    ("training.zzz=1", "--set training.zzz", "valid keys: epochs, max_steps"),
    ("lora.r.x=1", "--set lora.r", "not a section"),
    ("lora.r8", "--set 'lora.r8'", "KEY=VALUE"),
    ("=8", "--set '=8'", "KEY=VALUE"),
])
def test_set_mistakes(item, where, hint):
    with pytest.raises(RecipeError) as info:
        apply_override(minimal(), item)
    assert str(info.value).startswith(where) and hint in str(info.value)


def test_set_value_of_the_wrong_type_is_reported_at_validation():
    raw = minimal()
    apply_override(raw, "training.max_steps=ten")
    (problem,) = problems(raw)
    assert "training.max_steps" in problem and "'ten'" in problem


# ----------------------------------------------------------------------------------------------
# Field and cross-field checks


@pytest.mark.parametrize("section, values, path, text", [
    ("lora", {"r": 0}, "lora.r", "≥ 1"),
    ("lora", {"alpha": 0}, "lora.alpha", "> 0"),
    ("lora", {"dropout": 1.0}, "lora.dropout", "[0, 1)"),
    ("lora", {"target_modules": []}, "lora.target_modules", "preset"),
    ("lora", {"alpah": 16}, "lora.alpah", "did you mean 'alpha'?"),
    ("lora", {"bias": "some"}, "lora.bias", "expected one of: none, all, lora_only"),
    ("data", {"eval_fraction": 0.9}, "data.eval_fraction", "[0, 0.5]"),
    ("data", {"format": "alpacca"}, "data.format", "did you mean 'alpaca'?"),
    ("data", {"max_length": 4}, "data.max_length", "greater than or equal to 8"),
    ("data", {"prompt_template": "no placeholder"}, "data.prompt_template", "{instruction}"),
    ("model", {"task": "seq2seq"}, "model.task", "did you mean 'seq2seq_lm'?"),
    ("quantization", {"bits": 3}, "quantization.bits", "3"),
    ("training", {"learning_rate": 0}, "training.learning_rate", "greater than 0"),
    ("training", {"optim": "adamw"}, "training.optim", "adamw"),
])
def test_field_checks_name_the_dotted_path(section, values, path, text):
    (problem,) = problems(minimal(**{section: values}))
    assert problem.startswith(f"r.yaml: {path}:"), problem
    assert text in problem


def test_all_problems_are_reported_at_once():
    found = problems(minimal(lora={"r": 0, "dropout": 2}, data={"eval_fraction": 0.9}))
    assert [p.split(": ")[1] for p in found] == ["lora.r", "lora.dropout", "data.eval_fraction"]


@pytest.mark.parametrize("sections, path", [
    ({"model": {"task": "seq_cls"}, "data": {"format": "alpaca"}}, "data.format"),
    ({"data": {"format": "classification"}}, "model.task"),
    ({"quantization": {"bits": 4, "compute_dtype": "bfloat16"}, "training": {"precision": "fp16"}},
     "training.precision"),
    ({"quantization": {"bits": 8}, "lora": {"use_dora": True}}, "lora.use_dora"),
])
def test_cross_field_checks(sections, path):
    (problem,) = problems(minimal(**sections))
    assert f": {path}: " in problem, problem


def test_cross_field_checks_accept_consistent_recipes():
    validate_recipe(minimal(model={"task": "seq_cls"}, data={"format": "classification"}))
    validate_recipe(minimal(quantization={"bits": 4, "compute_dtype": "float16"}, training={"precision": "fp16"}))
    validate_recipe(minimal(quantization={"bits": 4}, lora={"use_dora": True}))


# ----------------------------------------------------------------------------------------------
# Files: YAML errors, dump round trip, paths


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path / "r.yaml", "model:\n  name: x\ndata:\n  train: a: b\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:4: invalid YAML")
    assert "quotes" in str(info.value)  # the fix, not only the parser's complaint


def test_missing_field_says_what_to_add():
    (problem,) = problems({"model": {"name": "owner/model"}, "data": {"format": "alpaca"}})
    assert problem.startswith("r.yaml: data.train: required; add it: Training data")


@pytest.mark.parametrize("text", ["- model\n- data\n", "just a string\n", "42\n"])
def test_recipe_must_be_a_mapping(tmp_path, text):
    with pytest.raises(RecipeError, match="a recipe is a mapping of sections"):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_recipe_not_utf8(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"model: {name: caf\xe9}\n")
    with pytest.raises(RecipeError, match="not valid UTF-8") as info:
        load_recipe(path)
    assert info.value.where == str(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_dump_recipe_round_trips(tmp_path):
    raw = minimal(lora={"r": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 3]},
                  training={"learning_rate": "3e-4", "max_steps": 10}, quantization={"bits": 4},
                  data={"format": "chat", "chat_template": "chatml", "columns": {"messages": "conversation"}})
    recipe = resolve_paths(validate_recipe(raw), tmp_path)  # as load_recipe gives it: output.dir absolute
    text = dump_recipe(recipe)
    assert list(yaml.safe_load(text)) == ["model", "quantization", "lora", "data", "training", "evaluation", "output",
                                          "advice"]
    again = load_recipe(write(tmp_path / "again.yaml", text))
    assert again == recipe
    assert again.training.learning_rate == pytest.approx(3e-4)
    assert dump_recipe(again) == text


def test_dump_keeps_the_multiline_prompt_template(tmp_path):
    recipe = validate_recipe(minimal())
    again = load_recipe(write(tmp_path / "again.yaml", dump_recipe(recipe)))
    assert again.data.prompt_template == ALPACA_TEMPLATE


def test_relative_paths_resolve_against_cwd_then_the_recipe_dir(tmp_path, monkeypatch):
    recipe_dir, cwd = tmp_path / "recipes", tmp_path / "cwd"
    (recipe_dir / "data").mkdir(parents=True)
    (recipe_dir / "models" / "tiny").mkdir(parents=True)
    cwd.mkdir()
    write(recipe_dir / "data" / "train.jsonl", "{}\n")
    path = write(recipe_dir / "r.yaml", "model: {name: models/tiny}\n"
                                        "data: {train: data/train.jsonl, eval: data/missing.jsonl}\n")
    monkeypatch.chdir(cwd)

    # Only in the recipe's directory: found there, written as an absolute path.
    recipe = load_recipe(path)
    assert recipe.data.train == str((recipe_dir / "data" / "train.jsonl").resolve())
    assert recipe.model.name == str((recipe_dir / "models" / "tiny").resolve())
    assert recipe.data.eval == "data/missing.jsonl"  # found nowhere: left for the stage to report

    # In both: the working directory wins.
    (cwd / "data").mkdir()
    write(cwd / "data" / "train.jsonl", "{}\n")
    assert load_recipe(path).data.train == str((cwd / "data" / "train.jsonl").resolve())


def test_hub_ids_and_absolute_paths_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = tmp_path / "elsewhere.jsonl"
    recipe = load_recipe(write(tmp_path / "r.yaml", f"model: {{name: HuggingFaceTB/SmolLM2-135M}}\n"
                                                    f"data: {{train: {absolute}}}\n"))
    assert recipe.model.name == "HuggingFaceTB/SmolLM2-135M"
    assert recipe.data.train == str(absolute)


def test_schema_has_every_section_and_field_docs():
    schema = recipe_schema()
    assert schema["title"] == "lorafit recipe"
    assert list(schema["properties"]) == list(Recipe.model_fields)
    assert len(schema["properties"]) == 8
    defs = schema["$defs"]
    for section in ("ModelSpec", "QuantizationSpec", "LoraSpec", "DataSpec", "TrainingSpec", "EvaluationSpec",
                    "OutputSpec"):
        for name, field in defs[section]["properties"].items():
            assert field.get("description"), f"{section}.{name} has no description"


def test_a_target_named_twice_is_adapted_once():
    from lorafit.recipe import validate_recipe

    recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": "t.jsonl"},
                              "lora": {"target_modules": ["q_proj", "v_proj", "q_proj"]}})
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]


def test_a_scalar_where_a_section_belongs_says_so():
    import pytest

    from lorafit.errors import RecipeError
    from lorafit.recipe import validate_recipe

    with pytest.raises(RecipeError) as err:
        validate_recipe({"model": {"name": "m"}, "data": {"train": "t.jsonl"}, "lora": 1})
    assert "lora: must be a section (a mapping with keys: r, alpha" in str(err.value)


# ----------------------------------------------------------------------------------------------
# Hostile recipes (issue 17): refused at once, with the place and the reason


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name, text, message", [
    ("alias bomb", _bomb(), "expands to more than 100,000 values"),
    ("doubling bomb", "a0: &a0 [x, x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 40)),
     "expands to more than"),
    ("deep flow", "model: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested more than 32 levels"),
    ("deep mapping", "model: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n", "nested more than 32 levels"),
    ("self reference", "model: &m {name: *m}\n", "refers to a value that contains it"),
    ("many aliases", "x: &x 1\ny: [" + ", ".join(["*x"] * 101) + "]\n", "more than 100 aliases"),
    ("huge", "# " + "x" * (MAX_RECIPE_BYTES + 10) + "\n", "larger than 1 MB"),
])
def test_hostile_recipes_are_refused_at_once(tmp_path, name, text, message):
    import tracemalloc

    path = write(tmp_path / "r.yaml", text)
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError, match=message) as info:
            load_recipe(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Refused before expanding: a few MiB (the alias bomb expanded took 1 GB). Memory, not seconds: no flakes.
    assert peak < 32 * 2**20, (name, peak)
    assert info.value.where.startswith(str(path)) and info.value.fix


def test_an_ordinary_anchor_still_works(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", "model: {name: owner/model}\ndata: {train: owner/dataset}\n"
                                                    "lora: {target_modules: &t [q_proj, v_proj], modules_to_save: *t}\n"))
    assert recipe.lora.target_modules == recipe.lora.modules_to_save == ["q_proj", "v_proj"]


@pytest.mark.parametrize("value, message", [
    ("x" * 10_001, "longer than 10,000 characters"),
    ("[" * 100 + "]" * 100, "nested more than 32"),
    ("[&a [1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], "
     "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]",
     "expands to more than"),
])
def test_set_values_are_capped_too(value, message):
    with pytest.raises(RecipeError, match=message) as info:
        apply_override({}, f"lora.target_modules={value}")
    assert info.value.where == "--set lora.target_modules"


def test_a_yaml_value_that_cannot_be_built_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="invalid YAML value.*quote the value"):
        load_recipe(write(tmp_path / "r.yaml", "model: {name: 2024-13-45}\ndata: {train: owner/dataset}\n"))
    assert apply_override(raw := {}, "model.name=2024-13-45") is None and raw["model"]["name"] == "2024-13-45"


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_infinite_or_nan_numbers_are_refused(value):
    assert any("lora.alpha" in p and "finite" in p for p in problems(minimal(lora={"alpha": value})))


def test_a_token_is_refused_and_never_echoed(monkeypatch):
    token = "hf_abcdefghijklmnopqrstuvwxyz012345"
    for raw in (minimal(output={"run_name": token}), minimal(lora={"target_modules": ["q_proj", token]})):
        found = problems(raw)
        assert "access token" in found[0] and token not in "\n".join(found)
    monkeypatch.setenv("HF_TOKEN", "secret-value-without-prefix")
    assert redact("x secret-value-without-prefix y " + token) == "x hf_*** y hf_***"
    assert "access token" in problems(minimal(output={"run_name": "secret-value-without-prefix"}))[0]


def test_allow_pickle_is_off_by_default():
    assert validate_recipe(minimal()).model.allow_pickle is False
    assert validate_recipe(minimal(model={"allow_pickle": True})).model.allow_pickle is True
