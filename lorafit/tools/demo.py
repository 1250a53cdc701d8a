"""`make demo`: fine-tune the built-in SmolLM2-135M-Instruct on the shipped date-normalisation task
(recipes/quickstart.yaml), then show base vs adapter on held-out dates: exact match, loss, examples.

Offline, a few minutes on a CPU: ``python -m lorafit.tools.demo [RUN_DIR] [KEY=VALUE ...]`` (default
runs/demo; KEY=VALUE are recipe overrides, as ``--set`` takes them). The numbers are the run's own
metrics.json["eval"] (the evaluate stage measures them: greedy generations, base with the adapter
disabled on the same weights); this script only runs the recipe and prints them side by side.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "quickstart.yaml"
EXAMPLES = 3


def main(argv: list[str] | None = None) -> int:
    from lorafit import render
    from lorafit.core import rundir
    from lorafit.errors import LorafitError
    from lorafit.pipeline import train
    from lorafit.recipe import load_recipe

    start = time.monotonic()
    args = sys.argv[1:] if argv is None else argv
    overrides = [a for a in args if "=" in a]
    positional = [a for a in args if "=" not in a]
    run_dir = Path(positional[0]) if positional else Path("runs/demo")
    try:
        recipe = load_recipe(RECIPE, [f"output.dir={run_dir}", "output.overwrite=true", *overrides])
        print(f"demo: LoRA r{recipe.lora.r} on {recipe.model.name} ({RECIPE.relative_to(REPO)}): "
              f"normalise dates to YYYY-MM-DD", flush=True)
        result = train(recipe)
    except LorafitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(render.train_lines(result)))
    print("\n".join(comparison_lines(result.metrics, recipe, time.monotonic() - start)))
    if (result.run_dir / rundir.REPORT).is_file():
        print(f"full report: {result.run_dir / rundir.REPORT}")
    return 0


def comparison_lines(metrics: dict, recipe, seconds: float) -> list[str]:
    """The before/after table and examples, from a run's metrics.json."""
    ev, tr = metrics.get("eval") or {}, metrics.get("train") or {}
    em = (ev.get("metrics") or {}).get("exact_match") or {}
    k = ev.get("few_shot_k") if em.get("few_shot") is not None else None
    shots = f"{f'base {k}-shot':>14}" if k else ""
    lines = ["", f"held-out: {ev.get('eval_rows', 0)} dates no training row shows ({_rel(recipe.data.eval)})",
             f"  {'':<16}{'base':>10}{shots}{'adapter':>10}"]
    if em:
        lines.append(f"  {'exact match':<16}{_pct(em.get('base')):>10}" + (f"{_pct(em['few_shot']):>14}" if k else "")
                     + f"{_pct(em.get('adapter')):>10}   greedy, {ev.get('metric_rows')} rows")
    else:
        lines.append(f"  exact match: not measured ({ev.get('metrics_note') or 'evaluation.metrics is off'})")
    if "eval_loss" in ev:
        lines.append(f"  {'held-out loss':<16}{_num(ev.get('base_eval_loss')):>10}" + (f"{'-':>14}" if k else "")
                     + f"{_num(ev['eval_loss']):>10}")
    if k:
        lines.append(f"  (base {k}-shot: the base shown {k} training dates before each question, no adapter)")
    if ev.get("outcome_rows"):
        lines.append(f"missed: {ev.get('wrong_rows', 0)} of {ev['outcome_rows']} held-out dates"
                     + "".join(f"\n  {f['prompt']} → {f.get('adapter', '')!r} (expected {f.get('reference', '')})"
                               for f in (ev.get("failures") or [])[:EXAMPLES]))
    lines += _retain_lines(ev.get("retain"))
    processed = tr.get("tokens_processed", tr.get("tokens_seen", 0))
    steps = f"{tr.get('steps')} steps of {recipe.training.batch_size * recipe.training.grad_accum} rows"
    lines.append(f"trained on {tr['trained_tokens']:,} tokens with a loss ({processed:,} processed, {steps})"
                 if tr.get("trained_tokens") is not None else f"trained on {processed:,} tokens processed ({steps})")
    samples = (ev.get("samples") or [])[:EXAMPLES]
    if samples:
        lines.append("\nexamples (greedy):")
        users = _user_turns(recipe.data.eval)
        for s in samples:
            prompt = next((u for u in users if u in s["prompt"]), None) or _last_turn(s["prompt"])
            lines += [f"  prompt  : {prompt}", f"  expected: {s['reference']}", f"  base    : {s.get('base', '')!r}",
                      f"  adapter : {s.get('adapter', '')!r}", ""]
    lines.append(f"total wall time: {_duration(seconds)}")
    return lines


def _retain_lines(retain: dict | None) -> list[str]:
    """What the adapter cost: the general questions the base answered right, asked again of the adapter."""
    if not retain:
        return []
    if "metrics" not in retain:
        return [f"general questions (forgetting): not measured: {retain.get('note', '')}"]
    contains, loss = retain["metrics"].get("contains") or {}, retain["metrics"].get("loss") or {}
    said = (f"general questions (forgetting): {retain['rows']} rows of {retain['source']}; still answered (contains) "
            f"base {_pct(contains.get('base'))} → adapter {_pct(contains.get('adapter'))}, loss {_num(loss.get('base'))} "
            f"→ {_num(loss.get('adapter'))}")
    lines = [said, ("  FORGETTING flagged (beyond " + f"{retain['tolerance']:.0%}): " + "; ".join(retain["flagged"]))
             if retain.get("flagged") else f"  no drop beyond {retain['tolerance']:.0%} of the base"]
    for s in (retain.get("samples") or [])[:EXAMPLES]:
        lines.append(f"  {s['prompt']} base {s['base']!r}, adapter {s['adapter']!r}")
    return lines


def _user_turns(path: str | None) -> list[str]:
    if not path or not Path(path).is_file():
        return []
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [m["content"] for r in rows for m in r.get("messages", []) if m.get("role") == "user"]


def _last_turn(prompt: str) -> str:
    """The user's words in a decoded chat prompt (role names are plain lines once special tokens go)."""
    lines = [line for line in prompt.splitlines() if line.strip() not in ("", "system", "user", "assistant")]
    return lines[-1] if lines else prompt


def _rel(path: str | None) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except (TypeError, ValueError):
        return str(path)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


if __name__ == "__main__":
    sys.exit(main())
