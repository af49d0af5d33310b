"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023).

Variants: biformer_tiny/small/base (the released ImageNet models), biformer_stl and
biformer_stl_nchw (the paper's Swin-Tiny-layout ablations), biformer_nano (ours, for 32-64 px
images) and biformer_stl_nano (ours: the STL layout at nano width, for ablations on small data).
All load the original release files through `checkpoint_filter_fn`.

Any input size from 32x32 up works: a stage whose map is smaller than n_win uses as many
regions as the map allows, and topk is capped at the region count. `padding="masked"`
(default) keeps padded tokens out of routing and attention; `padding="legacy"` reproduces the
original `auto_pad=True`.

Shape legend: B batch, C channels, H/W map height/width. Stages run blocks channels-last
(B, H, W, C) and hand NCHW maps between stages.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # timm has no public name for it
from torch import Tensor, nn

from ..checkpoints.inflation import inflate_state_dict
from ..checkpoints.original import check_release_source, checkpoint_filter_fn
from ..layers.depthwise import depthwise_conv
from ..layers.inplace import InplaceGELU, add_into
from ..layers.layout import channels_first, channels_last
from ..layers.mlp import LeanMlp
from ..layers.sdpa import scaled_dot_product_attention
from ..layers.weight_cast import weights_cast_once
from ..ops import BiLevelRoutingAttention
from .mixers import MIXERS

__all__ = ["BiFormer"]


class GlobalAttention(nn.Module):
    """Full multi-head attention with a depthwise "lepe" conv, BiFormer's last stage.

    The original applies lepe to the attention input in BiFormer-T/S/B and STL, and to V in
    the NCHW refactor (`lepe_on="value"`). Scale is head_dim ** -0.5, qkv has no bias.
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5, lepe_on: str = "input",
                 spatial_dims: int = 2) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.lepe_on = lepe_on
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.lepe = depthwise_conv(dim, side_dwconv, spatial_dims)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, *S, C) -> (B, *S, C); S: (H, W), or (T, H, W) for clips
        q, k, v = self.qkv(x.flatten(1, -2)).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        out = scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(x.shape)
        lepe_source = x if self.lepe_on == "input" else v.transpose(1, 2).reshape(x.shape)
        out = add_into(channels_last(self.lepe(channels_first(lepe_source))), out)
        return self.proj(out)


class Block(nn.Module):
    """[x + dwconv3x3(x)] -> x + attn(norm1(x)) -> x + mlp(norm2(x)); pre-norm, no layer scale."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, pos_embed: bool, drop_path: float,
                 spatial_dims: int = 2) -> None:
        super().__init__()
        self.pos_embed = depthwise_conv(dim, 3, spatial_dims) if pos_embed else None
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = LeanMlp(dim, int(dim * mlp_ratio))  # timm's Mlp (same keys) keeping less for the backward
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, *S, C)
        if self.pos_embed is not None:
            x = add_into(channels_last(self.pos_embed(channels_first(x))), x)
        x = add_into(self.drop_path(self.attn(self.norm1(x))), x)
        return add_into(self.drop_path(self.mlp(self.norm2(x))), x)


class BiFormerStage(nn.Module):
    """Downsampling (identity in the first stage, which follows the stem) then blocks.

    Under CUDA autocast the stage's Linear and conv weights are cast to half precision all at once
    (`weights_cast_once`: one cast kernel per stage instead of two per weight); `cast_weights_once=False`
    leaves each to autocast. Gradient checkpointing recomputes blocks after the stage's forward, so it
    leaves them to autocast too.
    """

    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False
        self.cast_weights_once = True

    def forward(self, x: Tensor) -> Tensor:  # (B, C, *S) -> (B, C', *S')
        checkpointing = self.grad_checkpointing and not torch.jit.is_scripting()
        with weights_cast_once(self, x.device, enabled=self.cast_weights_once and not checkpointing):
            x = channels_last(self.downsample(x)).contiguous()  # (B, *S, C) memory: channels-last convs, adds
            x = checkpoint_seq(self.blocks, x) if checkpointing else self.blocks(x)
        return channels_first(x)


# a stage's top-k may instead name full (global) attention, its lepe conv on V or on the attention's input; the
# original release codes these as topk -1 and -2, which are read as these names
GLOBAL_LEPE_ON_VALUE, GLOBAL_LEPE_ON_INPUT = "global_value", "global_input"
GLOBAL_MODES = {GLOBAL_LEPE_ON_VALUE: "value", GLOBAL_LEPE_ON_INPUT: "input"}
ORIGINAL_CODES = {-1: GLOBAL_LEPE_ON_VALUE, -2: GLOBAL_LEPE_ON_INPUT}


def _stage_topks(topks: int | str | tuple | list) -> tuple[int | str, ...]:
    """Per-stage top-k values: positive ints or GLOBAL_MODES names; also as text ("1,4,16,global_input", as
    --model-kwargs gives it) and with the original's codes -1/-2."""
    if isinstance(topks, str):
        parts = [int(part) if part.strip().lstrip("-").isdigit() else part.strip() for part in topks.split(",")]
        topks = parts[0] if len(parts) == 1 else parts
    values = tuple(ORIGINAL_CODES.get(value, value) for value in _per_stage(topks, "topks"))
    for i, value in enumerate(values):
        if not (isinstance(value, int) and value >= 1) and value not in GLOBAL_MODES:
            raise ValueError(f"topks[{i}]={value!r}: use a positive top-k, or {' or '.join(GLOBAL_MODES)} for full "
                             "attention")
    return values


def _token_mixer(attention: str, dim: int, heads: int, n_win: int | tuple[int, ...], topk: int | str,
                 side_dwconv: int, *, region_size: int | None, stripe_width: int, padding: str, backend: str | None,
                 block_index: int, spatial_dims: int = 2) -> nn.Module:
    """Block `block_index`'s token mixer: BRA, an ablation mixer (see BiFormer's `attention`), or full attention
    where topk names a GLOBAL_MODES mode."""
    if topk in GLOBAL_MODES:
        return GlobalAttention(dim, 8, side_dwconv, GLOBAL_MODES[topk], spatial_dims)
    if attention == "bra":
        return BiLevelRoutingAttention(dim, heads, n_win, topk, side_dwconv=side_dwconv, padding=padding,
                                       backend=backend, region_size=region_size, spatial_dims=spatial_dims)
    pattern = {"window": {"window_size": n_win, "shifted": block_index % 2 == 1}, "stripe": {"stripe_width": stripe_width},
               "grid": {"grid_size": n_win}, "full": {}}[attention]
    return MIXERS[attention](dim, heads, side_dwconv=side_dwconv, **pattern)


def _halving_conv(spatial_dims: int, channels_in: int, channels_out: int, merge_frames: bool = False,
                  isotropic: bool = False) -> nn.Module:
    """A 3x3 conv of stride 2 (the overlapping stem's and downsampling's); for clips in space only, but for the
    stem's first, which merges frame pairs (with the second, a 2x4x4 tubelet, as Video Swin's); for volumes
    (isotropic) 3x3x3 over every axis."""
    if spatial_dims == 2:
        return nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1)
    if isotropic:
        return nn.Conv3d(channels_in, channels_out, 3, stride=2, padding=1)
    time = 2 if merge_frames else 1
    return nn.Conv3d(channels_in, channels_out, (time, 3, 3), stride=(time, 2, 2), padding=(0, 1, 1))


def _region_counts(n_wins: tuple, spatial_dims: int, temporal_regions: int | tuple[int, ...], isotropic: bool) -> tuple:
    """Each stage's regions: n_win per side for images; (time or depth, rows, columns) for clips and volumes."""
    if isotropic and spatial_dims != 3:
        raise ValueError("isotropic is for volumes: spatial_dims=3")
    if spatial_dims == 2:
        return n_wins
    return tuple((count if isotropic else t, count, count)
                 for t, count in zip(_per_stage(temporal_regions, "temporal_regions"), n_wins))


def _per_stage(value, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * 4
    if len(values) != 4:
        raise ValueError(f"{name} must be one value or four (one per stage), got {value!r}")
    return values


class BiFormer(nn.Module):
    """BiFormer image classifier and dense-prediction backbone.

    Args:
        depths: blocks per stage.
        embed_dims: channels per stage.
        head_dim: channels per attention head in the BRA stages (heads = dim // head_dim).
        n_win: regions per side, one value or one per stage.
        region_size: tokens per region side, one value or one per stage; if given, n_win follows from
            each input's size (see BiLevelRoutingAttention), as dense prediction at any resolution wants.
        topks: routed regions per stage; "global_value" / "global_input" make the stage full attention with
            lepe on V / on the attention input (the original's codes -1 / -2 are read as these).
        mlp_ratio: MLP hidden width / dim.
        side_dwconv: kernel of the lepe convs.
        stem: "overlap" (conv3x3/s2-BN-GELU-conv3x3/s2-BN, BiFormer) or "patch" (conv4x4/s4-BN, STL).
        pos_embed: depthwise 3x3 conv position embedding at the start of each block.
        padding: "masked" (default), "legacy" (the original `auto_pad=True`) or "legacy_nchw" (the
            original NCHW layer's padding; what biformer_stl_nchw's "legacy" means).
        backend: force a BRA backend in every layer (see biformer.ops.available_backends()).
        attention: the token mixer of the stages with a positive topk, for the paper's ablation:
            "bra" (default), or a hand-crafted sparse attention of `biformer.models.mixers` in the same
            shell (qkv, lepe, proj): "window" (Swin: n_win x n_win-token windows, shifted in every
            other block), "stripe" (CSWin: stripes of stripe_widths[i] rows/columns), "grid" (MaxViT:
            an n_win x n_win grid) or "full". A stage whose topk names full attention keeps it.
        stripe_widths: stripe width per stage for attention="stripe" (CSWin-T's 1, 2, 7, 7).
        spatial_dims: 2 for images (B, 3, H, W); 3 for clips (B, 3, T, H, W): the convs become 3-D (the stem a
            2 x 4 x 4 tubelet, downsampling in space only, the depthwise convs over T, H, W), BRA routes among
            temporal_regions x n_win x n_win regions, and the pooling is over time too (see biformer3d_*).
        temporal_regions: with spatial_dims=3, regions along time per stage (one value or four).
        isotropic: with spatial_dims=3, a volume (B, C, D, H, W) whose axes are alike: the stem and downsampling
            halve every axis (strides 4 to 32 on each) and every axis has n_win regions (temporal_regions unused).
    """

    def __init__(
        self,
        depths: tuple[int, ...] = (2, 2, 8, 2),
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        head_dim: int = 32,
        n_win: int | tuple[int, ...] = 7,
        region_size: int | tuple[int | None, ...] | None = None,
        topks: tuple[int | str, ...] | str = (1, 4, 16, GLOBAL_LEPE_ON_INPUT),
        mlp_ratio: float = 3.0,
        side_dwconv: int = 5,
        stem: str = "overlap",
        pos_embed: bool = True,
        padding: str = "masked",
        backend: str | None = None,
        attention: str = "bra",
        stripe_widths: int | tuple[int, ...] = (1, 2, 7, 7),
        spatial_dims: int = 2,
        temporal_regions: int | tuple[int, ...] = 2,
        isotropic: bool = False,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        depths, embed_dims = _per_stage(depths, "depths"), _per_stage(embed_dims, "embed_dims")
        n_wins, topks = _per_stage(n_win, "n_win"), _stage_topks(topks)
        region_sizes, stripe_widths = _per_stage(region_size, "region_size"), _per_stage(stripe_widths, "stripe_widths")
        if attention != "bra" and attention not in MIXERS:
            raise ValueError(f"attention must be one of {', '.join(['bra', *MIXERS])}, got {attention!r}")
        if spatial_dims not in (2, 3) or (spatial_dims == 3 and (attention != "bra" or stem != "overlap")):
            raise ValueError(f"spatial_dims must be 2, or 3 with attention='bra' and stem='overlap', got "
                             f"spatial_dims={spatial_dims!r}, attention={attention!r}, stem={stem!r}")
        self.spatial_dims, self.isotropic = spatial_dims, isotropic
        n_wins = _region_counts(n_wins, spatial_dims, temporal_regions, isotropic)
        norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        halving = partial(_halving_conv, spatial_dims, isotropic=isotropic)
        self.topks = topks
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        if stem == "overlap":
            self.stem = nn.Sequential(halving(in_chans, embed_dims[0] // 2, merge_frames=True), norm(embed_dims[0] // 2),
                                      InplaceGELU(), halving(embed_dims[0] // 2, embed_dims[0]), norm(embed_dims[0]))
        elif stem == "patch":
            self.stem = nn.Sequential(nn.Conv2d(in_chans, embed_dims[0], 4, stride=4), nn.BatchNorm2d(embed_dims[0]))
        else:
            raise ValueError(f"stem must be 'overlap' or 'patch', got {stem!r}")

        total_blocks = sum(depths)  # stochastic depth grows linearly over all blocks
        drop_path_rates = [drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
        stages, self.feature_info = [], []
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            if i == 0:
                downsample = nn.Identity()
            elif stem == "overlap":
                downsample = nn.Sequential(halving(embed_dims[i - 1], dim), norm(dim))
            else:  # Swin-style patch merging: norm, then conv2x2/s2
                downsample = nn.Sequential(nn.BatchNorm2d(embed_dims[i - 1]), nn.Conv2d(embed_dims[i - 1], dim, 2, stride=2))
            mixer = partial(
                _token_mixer, attention, dim, dim // head_dim, n_wins[i], topks[i],
                side_dwconv, region_size=region_sizes[i], stripe_width=stripe_widths[i], padding=padding,
                backend=backend, spatial_dims=spatial_dims,
            )
            blocks = [
                Block(dim, mixer(block_index=j), mlp_ratio, pos_embed, drop_path_rates[sum(depths[:i]) + j], spatial_dims)
                for j in range(depth)
            ]
            stages.append(BiFormerStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = norm(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for num_classes (0: no head, forward returns pooled features)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (NCHW) at `indices` (last n if int, all if None), and the final features.

        With norm=True the last stage's intermediate goes through the final norm, so it equals
        forward_features.
        """
        if output_fmt not in ("NCHW", "NCTHW")[: self.spatial_dims - 1]:
            raise ValueError(f"output_fmt must be 'NCHW' (channels first{', NCTHW' * (self.spatial_dims == 3)}), got "
                             f"{output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        for index, stage in enumerate(stages):
            x = stage(x)
            if index in take_indices:
                intermediates.append(self.norm(x) if norm and index == last_index else x)
        if intermediates_only:
            return intermediates
        if index == last_index:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the stages (and norm/head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if prune_head or max_index < 3:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        if self.spatial_dims == 3 and isinstance(x.shape[2], int) and x.shape[2] < 2:
            raise ValueError(f"a clip model takes clips (B, C, T, H, W) of at least 2 frames (its stem merges frame "
                             f"pairs; an odd clip's last frame is left out), got shape {tuple(x.shape)}")
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(tuple(range(2, x.dim())))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# Construction, configs and registration
# ----------------------------------------------------------------------------------------------

def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    if pretrained:
        check_release_source(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    return build_model_with_cfg(
        BiFormer,
        variant,
        pretrained,
        pretrained_filter_fn=_inflating_filter if kwargs.get("spatial_dims") == 3 else checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def _inflating_filter(state_dict: dict[str, Tensor], model: BiFormer) -> dict[str, Tensor]:
    """An image checkpoint (the release's layout or ours) for a clip model, its conv kernels inflated over time."""
    return inflate_state_dict(checkpoint_filter_fn(state_dict, model), model)[0]


def _cfg(url: str = "", **kwargs) -> dict:
    # The paper's evaluation: 224x224 centre crop of a 256 resize (crop_pct 0.875), bicubic, ImageNet mean/std.
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2303.08810",
        **kwargs,
    }


# the frames of a clip model's reference clip (what `flops` and `bench` count it on)
CLIP_FRAMES = {"biformer3d_tiny": 16, "biformer3d_small": 16, "biformer3d_base": 16, "biformer3d_nano": 8}

default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(url="https://matix.li/e36fe9fb086c"),
    "biformer_small.in1k": _cfg(url="https://matix.li/5bb436318902"),
    "biformer_base.in1k": _cfg(url="https://matix.li/995db75f585d"),
    "biformer_stl.in1k": _cfg(url="https://matix.li/4e9034a91a23"),
    "biformer_stl_nchw.in1k": _cfg(
        url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChWYrKbWbMgqd2Ai0/root/content"
    ),
    "biformer_nano": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0),
    "biformer_stl_nano": _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
    # clips (B, 3, T, H, W) of CLIP_FRAMES frames; timm's input_size holds a frame's size. No released weights:
    # --pretrained inflates an image model's
    **{f"biformer3d_{size}": _cfg(pool_size=(8, 7, 7)) for size in ("tiny", "small", "base")},
    "biformer3d_nano": _cfg(input_size=(3, 64, 64), pool_size=(4, 2, 2), crop_pct=1.0),
})

STL_ARGS = dict(depths=(2, 2, 6, 2), embed_dims=(96, 192, 384, 768), mlp_ratio=4.0, stem="patch", pos_embed=False)


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: 13.1M parameters, 2.2 GFLOPs at 224."""
    return _create_biformer("biformer_tiny", pretrained, **{"depths": (2, 2, 8, 2), **kwargs})


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: 25.5M parameters, 4.5 GFLOPs at 224."""
    return _create_biformer("biformer_small", pretrained, **{"depths": (4, 4, 18, 4), **kwargs})


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: 56.8M parameters, 9.8 GFLOPs at 224."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained, **{**args, **kwargs})


@register_model
def biformer_stl(pretrained: bool = False, **kwargs) -> BiFormer:
    """Swin-Tiny layout with BRA (paper's ablation), legacy attention layout."""
    return _create_biformer("biformer_stl", pretrained, **{**STL_ARGS, **kwargs})


@register_model
def biformer_stl_nchw(pretrained: bool = False, **kwargs) -> BiFormer:
    """Swin-Tiny layout with BRA, the original's NCHW refactor (last stage: lepe on V).

    Its `padding="legacy"` is the NCHW layer's own ("legacy_nchw": floor-sized regions, zero padding
    after the projection), which differs from the other variants' `auto_pad=True` on padded maps.
    """
    args = dict(STL_ARGS, topks=(1, 4, 16, GLOBAL_LEPE_ON_VALUE))
    if kwargs.get("padding") == "legacy":
        kwargs["padding"] = "legacy_nchw"
    return _create_biformer("biformer_stl_nchw", pretrained, **{**args, **kwargs})


@register_model
def biformer_nano(pretrained: bool = False, **kwargs) -> BiFormer:
    """A small BiFormer (ours) for 32-64 px images: 4x4 regions, narrow stages, 3x3 lepe."""
    args = dict(
        depths=(1, 1, 3, 1), embed_dims=(32, 64, 128, 256), head_dim=16, n_win=4, topks=(4, 4, 4, GLOBAL_LEPE_ON_INPUT),
        side_dwconv=3
    )
    return _create_biformer("biformer_nano", pretrained, **{**args, **kwargs})


@register_model
def biformer_stl_nano(pretrained: bool = False, **kwargs) -> BiFormer:
    """The STL layout (ours) at biformer_nano's width for 64 px images: 4x4 regions, so that the
    attention ablations (`attention=`, `biformer ablate`) run on small data sets in minutes."""
    args = dict(STL_ARGS, embed_dims=(32, 64, 128, 256), head_dim=16, n_win=4)
    return _create_biformer("biformer_stl_nano", pretrained, **{**args, **kwargs})


# Clip models: the family's widths, depths and heads over (time, height, width); see BiFormer's spatial_dims.
CLIP_ARGS = dict(spatial_dims=3, temporal_regions=2)  # regions of 4 of the 8 frames the stem leaves of 16


@register_model
def biformer3d_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T for clips (B, 3, T, H, W); --pretrained inflates biformer_tiny's weights."""
    return _create_biformer("biformer3d_tiny", pretrained, **{**CLIP_ARGS, "depths": (2, 2, 8, 2), **kwargs})


@register_model
def biformer3d_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S for clips; --pretrained inflates biformer_small's weights."""
    return _create_biformer("biformer3d_small", pretrained, **{**CLIP_ARGS, "depths": (4, 4, 18, 4), **kwargs})


@register_model
def biformer3d_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B for clips; --pretrained inflates biformer_base's weights."""
    args = dict(CLIP_ARGS, depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer3d_base", pretrained, **{**args, **kwargs})


@register_model
def biformer3d_nano(pretrained: bool = False, **kwargs) -> BiFormer:
    """biformer_nano for clips of 64 px frames (ours, for tests and small data)."""
    args = dict(CLIP_ARGS, depths=(1, 1, 3, 1), embed_dims=(32, 64, 128, 256), head_dim=16, n_win=4,
                topks=(4, 4, 4, GLOBAL_LEPE_ON_INPUT), side_dwconv=3)
    return _create_biformer("biformer3d_nano", pretrained, **{**args, **kwargs})

