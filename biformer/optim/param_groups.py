"""Which parameters take weight decay, by the rule a recipe states.

- timm: 1-D parameters (norms' scales and shifts, biases...), names ending in `.bias` and the names the model's
  `no_weight_decay()` returns take none (timm's optimizer factory, used by the ImageNet recipe);
- mmcv: names containing `norm`, `absolute_pos_embed` or `relative_position_bias_table` take none, everything
  else decays, biases included (the dense configs' `paramwise_cfg` custom keys with decay_mult 0);
- all: every parameter decays (a dense config without `paramwise_cfg`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

DECAY_RULES = ("timm", "mmcv", "all")
MMCV_NO_DECAY_KEYS = ("norm", "absolute_pos_embed", "relative_position_bias_table")


def decays(name: str, parameter: nn.Parameter, rule: str, no_weight_decay: frozenset[str]) -> bool:
    """Whether parameter `name` takes weight decay under `rule`."""
    if rule == "timm":
        return parameter.ndim > 1 and not name.endswith(".bias") and name not in no_weight_decay
    if rule == "mmcv":
        return not any(key in name for key in MMCV_NO_DECAY_KEYS)
    if rule == "all":
        return True
    raise ValueError(f"weight-decay rule {rule!r}: expected one of {', '.join(DECAY_RULES)}")


@dataclass
class ParameterGroup:
    weight_decay: float
    names: list[str]
    parameters: list[nn.Parameter]

    def as_optimizer_group(self) -> dict:
        return {"params": self.parameters, "weight_decay": self.weight_decay}


def parameter_groups(model: nn.Module, weight_decay: float, rule: str) -> list[ParameterGroup]:
    """The trainable parameters split into a decayed group and one without decay (empty groups left out)."""
    skip = getattr(model, "no_weight_decay", None)
    no_weight_decay = frozenset(skip()) if rule == "timm" and callable(skip) else frozenset()
    decayed, exempt = ParameterGroup(weight_decay, [], []), ParameterGroup(0.0, [], [])
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            group = decayed if weight_decay and decays(name, parameter, rule, no_weight_decay) else exempt
            group.names.append(name)
            group.parameters.append(parameter)
    return [group for group in (decayed, exempt) if group.parameters]
