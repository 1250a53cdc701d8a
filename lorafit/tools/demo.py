"""`make demo`: fine-tune the shipped tiny model on the shipped data, then show base vs adapter.

Offline, a few seconds on CPU: ``python -m lorafit.tools.demo [RUN_DIR]`` (default runs/demo).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "tiny-smoke.yaml"
PROMPTS = ["What is two plus three?", "Translate hello into French."]


def main(argv: list[str] | None = None) -> int:
    from lorafit import render
    from lorafit.commands.generate import complete, load_for_inference
    from lorafit.errors import LorafitError
    from lorafit.pipeline import train
    from lorafit.recipe import load_recipe

    args = sys.argv[1:] if argv is None else argv
    run_dir = Path(args[0]) if args else Path("runs/demo")
    try:
        recipe = load_recipe(RECIPE, [f"output.dir={run_dir}", "output.overwrite=true"])
        result = train(recipe)
    except LorafitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(render.train_lines(result)))

    model, tokenizer, run_recipe = load_for_inference(run_dir)
    rows = []
    for prompt in PROMPTS:
        tuned = complete(model, tokenizer, run_recipe, prompt, max_new_tokens=12)
        with model.disable_adapter():
            base = complete(model, tokenizer, run_recipe, prompt, max_new_tokens=12)
        rows.append((prompt, base, tuned))
    print("\nbefore / after (greedy, 12 tokens):")
    for prompt, base, tuned in rows:
        print(f"  prompt : {prompt}\n  base   : {base!r}\n  adapter: {tuned!r}\n")
    ev = result.metrics.get("eval", {})
    print(f"held-out loss: base {ev['base_eval_loss']:.4f} → adapter {ev['eval_loss']:.4f} "
          f"(perplexity {ev['base_eval_perplexity']:,.1f} → {ev['eval_perplexity']:,.1f}) on {ev['eval_rows']} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
