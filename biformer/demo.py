"""Forward/backward demo of the BRA layer (the main job until the training command lands)."""
import torch

from biformer.ops import BiLevelRoutingAttention


def main() -> None:
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(dim=64, num_heads=2, n_win=7, topk=4, channels_last=False)
    x = torch.randn(2, 64, 30, 33, requires_grad=True)
    out = layer(x)
    out.square().mean().backward()
    print(f"BRA output {tuple(out.shape)}, input grad norm {x.grad.norm():.4f}")


if __name__ == "__main__":
    main()
