"""`biformer train` with test callbacks installed; a script for python or torchrun (pytest does not collect it).

    python tests/hooked_train.py [--kill-at-step N] [--record-shards DIR] <biformer train options>

--kill-at-step N: SIGKILL this process when global training step N is about to run (a crash at an
arbitrary moment, with no chance to clean up). --record-shards DIR: write DIR/rank<r>.json with the
sample indices this rank trained on per epoch and a sha256 of its final weights.
"""
import argparse
import hashlib
import json
import os
import signal
from pathlib import Path

from torch import nn

from biformer.cli import build_parser
from biformer.commands.train import config_from_args
from biformer.runtime import DistEnv
from biformer.training.engine import Callbacks, train


class Hooks(Callbacks):
    def __init__(self, kill_at_step: int | None, record_shards: Path | None) -> None:
        self.kill_at_step, self.record_shards = kill_at_step, record_shards
        self.indices: dict[str, list[int]] = {}

    def on_epoch_start(self, epoch: int, indices: list[int]) -> None:
        self.indices[str(epoch)] = indices

    def on_step(self, global_step: int) -> None:
        if global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, model: nn.Module, env: DistEnv) -> None:
        if self.record_shards is None:
            return
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.record_shards.mkdir(parents=True, exist_ok=True)
        (self.record_shards / f"rank{env.rank}.json").write_text(
            json.dumps({"indices": self.indices, "weights_sha256": digest.hexdigest()}))


if __name__ == "__main__":
    hooks = argparse.ArgumentParser(allow_abbrev=False)  # the rest are train's options
    hooks.add_argument("--kill-at-step", type=int)
    hooks.add_argument("--record-shards", type=Path)
    own, train_argv = hooks.parse_known_args()
    train(config_from_args(build_parser().parse_args(["train", *train_argv])),
          callbacks=Hooks(own.kill_at_step, own.record_shards))
