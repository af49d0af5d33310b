"""BRA for MONAI networks: channels-first blocks on (B, C, D, H, W) volumes (or (B, C, H, W) images), as MONAI's
own blocks take them.

    import torch
    from monai.networks.nets import BasicUNet
    from biformer.integrations.monai import BRATransformerBlock

    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=3, features=(16, 32, 64, 128, 256, 16))
    net.down_4 = torch.nn.Sequential(net.down_4, BRATransformerBlock(256, num_heads=8, n_win=2, topk=4))
    print(tuple(net(torch.randn(1, 1, 64, 64, 64)).shape))        # (1, 3, 64, 64, 64)

The attention alone, channels first, is the op's own layer: `BiLevelRoutingAttention(dim, heads, n_win, topk,
spatial_dims=3, channels_last=False)`. Both need only torch (MONAI builds the network around them).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..layers.layout import channels_first, channels_last
from ..ops import BiLevelRoutingAttention


class BRATransformerBlock(nn.Module):
    """A BiFormer block on channels-first maps, as MONAI's blocks are: x + BRA(norm(x)), then x + MLP(norm(x));
    (B, C, *S) -> (B, C, *S), S of 1, 2 or 3 axes. Any size: maps the regions do not divide are padded and the
    padding masked."""

    def __init__(self, dim: int, num_heads: int, n_win: int | tuple[int, ...] = 7, topk: int = 4,
                 mlp_ratio: float = 3.0, spatial_dims: int = 3, side_dwconv: int = 5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = BiLevelRoutingAttention(dim, num_heads, n_win, topk, side_dwconv=side_dwconv,
                                                 spatial_dims=spatial_dims, channels_last=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, *S)
        x = channels_last(x)  # (B, *S, C): the norms and the MLP work on the channels
        x = x + self.attention(self.norm1(x))
        return channels_first(x + self.mlp(self.norm2(x)))
