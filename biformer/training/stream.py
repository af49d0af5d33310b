"""The order in which a run trains on its samples, and their augmentation's randomness, as functions of the step.

Each data epoch shuffles the training set by (seed, epoch) (with repeated augmentation each image then appears
`repeats` times in a row, and the epoch keeps the set's length). Optimizer step t of the epoch trains on the
positions [t * G, (t + 1) * G) of that order, G = batch x processes x micro-steps: micro-step k of rank r takes
the positions (t * micro_steps + k) * batch * processes + j * processes + r, j < batch. So the same global batch
covers the same samples whatever its split into processes and micro-steps, and a run resumed at any step sees
the same samples. Every sample is augmented under random generators seeded by (seed, epoch, position), in
whichever process loads it, so its augmentation does not depend on the loader's workers or on a restart.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import UserError

SampleKey = tuple[int, int, int]  # (epoch, position in the epoch's order, index into the data set)


@dataclass(frozen=True)
class TrainStream:
    samples: int  # training set size
    batch_size: int  # per process and micro-step
    micro_steps: int
    world: int
    rank: int
    seed: int
    repeats: int = 1

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {self.batch_size} x {self.world} process(es) x --accum-steps "
                            f"{self.micro_steps} exceeds the {self.samples} training images")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world * self.micro_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.samples // self.global_batch  # the rest of each epoch's order is left out

    def order(self, epoch: int) -> list[int]:
        """The data set indices of epoch `epoch` (from 1) in training order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.samples, generator=generator).tolist()
        if self.repeats > 1:
            permutation = [index for index in permutation for _ in range(self.repeats)][: self.samples]
        return permutation

    def positions(self, step: int) -> list[list[int]]:
        """This rank's positions for optimizer step `step` of its epoch, one list per micro-step."""
        micro = self.batch_size * self.world
        return [[(step * self.micro_steps + k) * micro + j * self.world + self.rank for j in range(self.batch_size)]
                for k in range(self.micro_steps)]

    def micro_batches(self, start: int, end: int) -> Iterator[list[SampleKey]]:
        """The keys of this rank's micro-batches for the optimizer steps [start, end) (counted over all epochs)."""
        order, order_epoch = [], 0
        for step in range(start, end):
            epoch, in_epoch = step // self.steps_per_epoch + 1, step % self.steps_per_epoch
            if epoch != order_epoch:
                order, order_epoch = self.order(epoch), epoch
            for positions in self.positions(in_epoch):
                yield [(epoch, position, order[position]) for position in positions]

    def epoch_indices(self, epoch: int) -> list[int]:
        """The samples this rank trains on in epoch `epoch`, in order."""
        order = self.order(epoch)
        return [order[position] for step in range(self.steps_per_epoch)
                for positions in self.positions(step) for position in positions]


class RoundBatches(Sampler):
    """A DataLoader batch sampler over the micro-batches of steps [start, end)."""

    def __init__(self, stream: TrainStream, start: int, end: int) -> None:
        self.stream, self.start, self.end = stream, start, end

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return self.stream.micro_batches(self.start, self.end)

    def __len__(self) -> int:
        return (self.end - self.start) * self.stream.micro_steps


def seed_sample(seed: int, epoch: int, position: int) -> None:
    """Seed Python's, NumPy's and torch's CPU generators for one sample's augmentation."""
    value = (seed * 1_000_003 + epoch) * 2_147_483_647 + position
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.random.default_generator.manual_seed(value % 2**63)


class SeededSamples(Dataset):
    """A training set read by SampleKey, each sample augmented under its own seed (see `seed_sample`)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey):
        epoch, position, index = key
        seed_sample(self.seed, epoch, position)
        return self.dataset[index]
