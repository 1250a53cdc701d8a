"""export --verify's verdict at f16: the GGUF answers as lorafit does and the GGUF LoRA on the exported base answers
as the merged GGUF does, on every prompt; one prompt otherwise is a failure that says which comparison."""

from __future__ import annotations

from lorafit.export.gguf_verify import f16_failures


def _agreement(identical: int, prompts: int = 4) -> dict:
    return {"prompts": prompts, "identical": identical, "rate": identical / prompts, "differing": []}


def test_f16_fails_on_one_prompt_of_either_comparison():
    assert f16_failures({"gguf_vs_lorafit": _agreement(4), "gguf_lora_vs_gguf": _agreement(4),
                         "transformers_gguf_vs_lorafit": _agreement(2)}) == []  # a reader's view: reported only
    lora = f16_failures({"gguf_vs_lorafit": _agreement(4), "gguf_lora_vs_gguf": _agreement(3)})
    assert lora == ["the GGUF LoRA on the exported f16 base answers 1 of 4 prompts differently from the merged f16 GGUF"]
    both = f16_failures({"gguf_vs_lorafit": _agreement(2), "gguf_lora_vs_gguf": _agreement(0)})
    assert both[0] == "the f16 GGUF answers 2 of 4 prompts differently from lorafit" and len(both) == 2
    assert f16_failures({"gguf_vs_lorafit": _agreement(4)}) == []  # no LoRA file (DoRA, modules_to_save): no check
