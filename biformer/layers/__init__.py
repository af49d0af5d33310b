"""General layers that BRA, the models and the mixers share (torch only): a memory-lean MLP, a depthwise
convolution with a fast weight gradient, in-place helpers that autograd allows, and an SDPA call that keeps
half precision where the CPU kernel would not."""
from .depthwise import DepthwiseConv2d
from .mlp import LeanMlp

__all__ = ["DepthwiseConv2d", "LeanMlp"]
