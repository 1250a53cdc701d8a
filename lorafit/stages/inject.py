"""Inject stage: resolve lora.target_modules against the model's own modules, wrap it with peft."""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.core.policies import lora_config
from lorafit.core.targets import resolve_targets
from lorafit.core.weights import count_adapted
from lorafit.recipe import LoraSpec


@dataclass
class Injection:
    target_keys: list[str]      # what adapter_config.json's target_modules holds
    adapted_modules: int        # matrices that got an A and a B
    trainable_params: int
    total_params: int
    saved_modules: tuple[str, ...] = ()  # trained in full (modules_to_save: a seq_cls / token_cls head)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


def inject_lora(model, spec: LoraSpec, task: str, *, model_name: str = "model", revision: str | None = None):
    """Wrap *model* with LoRA. Returns (peft_model, Injection). Seed before calling: init draws A."""
    from peft import get_peft_model

    keys, _ = resolve_targets(model, spec.target_modules, model_name=model_name)
    peft_model = get_peft_model(model, lora_config(spec, task, keys, model=model, revision=revision))
    trainable, total = peft_model.get_nb_trainable_parameters()
    adapted = count_adapted(peft_model)
    saved = tuple(name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
                  if type(m).__name__ == "ModulesToSaveWrapper")
    return peft_model, Injection(keys, adapted, int(trainable), int(total), saved)
