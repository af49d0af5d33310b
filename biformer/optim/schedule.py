"""Learning-rate schedules as a pure function of the optimizer step: cosine, step and poly, each after a linear
warm-up of timm's or of mmcv's form.

The lr of step s (counted from 0) depends on s alone, so a resumed run needs no scheduler state. The schedule's
progress counts optimizer steps, or epochs (`per_epoch`: the lr changes at epoch boundaries only, as timm's
epoch-stepped schedulers and mmdet's by-epoch step policy do); the total length and the step milestones are in
that unit. The warm-up always counts steps for mmcv's form (mmcv warms up by iteration) and the progress unit
for timm's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("cosine", "step", "poly")
WARMUP_RULES = ("timm", "mmcv")


@dataclass(frozen=True)
class Schedule:
    kind: str  # one of SCHEDULES
    lr: float  # the peak (scheduled) learning rate
    total_steps: int  # optimizer steps in the run
    steps_per_epoch: int
    per_epoch: bool = False  # progress in epochs (else in steps)
    min_lr: float = 0.0  # cosine: the final lr; poly: the floor it decays to; step: none
    milestones: tuple[int, ...] = ()  # step: progress values at which the lr is multiplied by decay_rate
    decay_rate: float = 0.1
    power: float = 1.0  # poly
    warmup_steps: int = 0
    warmup_rule: str = "timm"  # one of WARMUP_RULES
    warmup_ratio: float = 0.01  # the warm-up's first lr as a fraction of lr (timm) or of the scheduled lr (mmcv)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule {self.kind!r}: expected one of {', '.join(SCHEDULES)}")
        if self.warmup_rule not in WARMUP_RULES:
            raise ValueError(f"warm-up rule {self.warmup_rule!r}: expected one of {', '.join(WARMUP_RULES)}")

    @property
    def unit(self) -> int:
        """Steps per unit of progress."""
        return self.steps_per_epoch if self.per_epoch else 1

    def progress(self, step: int) -> int:
        return step // self.unit

    def regular(self, step: int) -> float:
        """The scheduled lr of `step` without the warm-up."""
        progress, total = self.progress(step), self.total_steps / self.unit
        if self.kind == "cosine":  # timm's single cycle; at and past the end: min_lr
            if progress >= total:
                return self.min_lr
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress / total))
        if self.kind == "step":  # mmcv's StepLrUpdater (and timm's MultiStep): one decay per milestone passed
            return self.lr * self.decay_rate ** sum(progress >= milestone for milestone in self.milestones)
        return (self.lr - self.min_lr) * (1 - progress / total) ** self.power + self.min_lr  # mmcv's PolyLrUpdater

    def __call__(self, step: int) -> float:
        """The lr optimizer step `step` runs with."""
        if self.warmup_rule == "mmcv":
            if step >= self.warmup_steps:
                return self.regular(step)
            k = (1 - step / self.warmup_steps) * (1 - self.warmup_ratio)
            return self.regular(step) * (1 - k)
        warmup = self.warmup_steps / self.unit  # timm: from lr * warmup_ratio up to lr, in the progress unit
        progress = self.progress(step)
        if progress >= warmup:
            return self.regular(step)
        start = self.lr * self.warmup_ratio
        return start + progress * (self.lr - start) / warmup
