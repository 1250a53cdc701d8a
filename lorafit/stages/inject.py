"""Inject stage: resolve lora.target_modules against the model's own modules, wrap it with peft."""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.recipe import LoraSpec

TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "seq2seq_lm": "SEQ_2_SEQ_LM"}


@dataclass
class Injection:
    target_keys: list[str]      # what adapter_config.json's target_modules holds
    adapted_modules: int        # matrices that got an A and a B
    trainable_params: int
    total_params: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


def lora_config(spec: LoraSpec, task: str, target_keys: list[str], *, fan_in_fan_out: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        fan_in_fan_out=fan_in_fan_out,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target_keys,
        bias=spec.bias,
        modules_to_save=spec.modules_to_save,
        layers_to_transform=spec.layers_to_transform,
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
        task_type=TASK_TYPES[task],
    )


def inject_lora(model, spec: LoraSpec, task: str, *, model_name: str = "model"):
    """Wrap *model* with LoRA. Returns (peft_model, Injection). Seed before calling: init draws A."""
    from peft import get_peft_model

    from lorafit.targets import resolve_targets

    keys, chosen = resolve_targets(model, spec.target_modules, model_name=model_name)
    # GPT-2's Conv1D stores weights transposed; peft must know, or it warns and flips it itself.
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())
    peft_model = get_peft_model(model, lora_config(spec, task, keys, fan_in_fan_out=conv1d))
    trainable, total = peft_model.get_nb_trainable_parameters()
    adapted = sum(1 for name, _ in peft_model.named_modules() if name.endswith(".lora_A"))
    return peft_model, Injection(keys, adapted, int(trainable), int(total))
