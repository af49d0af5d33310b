"""Image weights for clip models (I3D's inflation): a 2-D BiFormer's state dict made to fit a 3-D one.

A 3-D BiFormer (`spatial_dims=3`, the biformer3d_* models) has the 2-D model's tensors but for its convs, whose
kernels gain a time axis. Each 2-D kernel is spread over time so that a clip of identical frames gives what the
image gives: a conv that pads time to keep its length (the depthwise position and lepe convs) takes the 2-D
kernel at its centre frame and zeros elsewhere; one that does not pad time (the stem's frame-pair merge, the
space-only downsampling) takes the 2-D kernel divided by its temporal size at every frame. Attention, MLP, norm
and head tensors carry over as they are.
"""
from __future__ import annotations

from torch import Tensor, nn


def inflate_state_dict(state_dict: dict[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """(the state dict with every 2-D conv kernel that the model has as a 3-D one inflated, the inflated keys);
    state_dict in our layout (see `biformer.checkpoints.original.checkpoint_filter_fn` for the release's)."""
    own = model.state_dict()
    convs = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv3d)}
    inflated, names = dict(state_dict), []
    for key, value in state_dict.items():
        module_name, _, tensor_name = key.rpartition(".")
        conv, target = convs.get(module_name), own.get(key)
        if conv is None or tensor_name != "weight" or target is None or value.dim() != 4 or target.dim() != 5:
            continue
        if tuple(target.shape[:2]) + tuple(target.shape[3:]) != tuple(value.shape):
            continue  # another width or kernel: left for the loader to report
        time = target.shape[2]
        if time % 2 == 1 and conv.padding[0] == time // 2:  # keeps the clip's length: the centre frame's kernel
            kernel = value.new_zeros(target.shape)
            kernel[:, :, time // 2] = value
        else:  # every output frame sums `time` input frames: each gets its share
            kernel = value.unsqueeze(2).expand(target.shape) / time
        inflated[key] = kernel.contiguous()
        names.append(key)
    return inflated, names
