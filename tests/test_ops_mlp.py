"""LeanMlp against timm's Mlp(act_layer=nn.GELU) with the same weights: values, gradients, keys, autocast."""
import pytest
import torch
from timm.layers import Mlp
from torch import Tensor, nn

from biformer.layers.mlp import LeanMlp, linear_gelu_linear


def _pair(approximate: str = "none", dtype: torch.dtype = torch.float32) -> tuple[LeanMlp, Mlp]:
    torch.manual_seed(0)
    lean = LeanMlp(6, 20, approximate=approximate).to(dtype)
    oracle = Mlp(6, 20, act_layer=lambda: nn.GELU(approximate=approximate)).to(dtype)
    oracle.load_state_dict(lean.state_dict())
    return lean, oracle


def _grads(module: nn.Module, x: Tensor, grad_out: Tensor) -> tuple[Tensor, list[Tensor]]:
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    return out, [x.grad] + [p.grad for _, p in sorted(module.named_parameters())]


def test_state_dict_keys_equal_timm_mlp():
    lean, oracle = _pair()
    assert list(lean.state_dict()) == list(oracle.state_dict())
    assert {k: v.shape for k, v in lean.state_dict().items()} == {k: v.shape for k, v in oracle.state_dict().items()}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_values_and_gradients_equal_timm_mlp(approximate):
    lean, oracle = _pair(approximate)
    x, grad_out = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
    got, got_grads = _grads(lean, x, grad_out)
    want, want_grads = _grads(oracle, x, grad_out)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):  # input, fc1.bias, fc1.weight, fc2.bias, fc2.weight
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_gradcheck_float64():
    torch.manual_seed(0)
    args = [torch.randn(*shape, dtype=torch.float64, requires_grad=True)
            for shape in [(2, 3, 4), (5, 4), (5,), (3, 5), (3,)]]
    assert torch.autograd.gradcheck(linear_gelu_linear, args)
    no_bias = [args[0], args[1], None, args[3], None]
    assert torch.autograd.gradcheck(linear_gelu_linear, no_bias)


def test_saves_input_and_hidden_only():
    """The memory claim: one hidden-width tensor saved (h), not two (h and gelu(h))."""
    lean, oracle = _pair()
    x = torch.randn(4, 6, requires_grad=True)

    def saved_hidden(module: nn.Module) -> int:
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            module(x)
        return shapes.count((4, 20))  # (tokens, hidden); the weights are (20, 6) and (6, 20)

    assert saved_hidden(lean) == 1 and saved_hidden(oracle) == 2


def test_inference_records_nothing_and_matches():
    lean, oracle = _pair()
    x = torch.randn(3, 6)
    with torch.no_grad():
        out = lean(x)
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, oracle(x), atol=1e-6, rtol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(lean(x), oracle(x), atol=1e-6, rtol=1e-6)


def test_bfloat16_autocast_cpu_matches_timm_mlp():
    lean, oracle = _pair()
    x, grad_out = torch.randn(4, 7, 6), torch.randn(4, 7, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grads = _grads(lean, x, grad_out)
        want, want_grads = _grads(oracle, x, grad_out)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype == torch.float32  # gradients of the float32 leaves, as autocast gives
        torch.testing.assert_close(g, w, atol=3e-2, rtol=3e-2)


def test_double_backward_raises_rather_than_being_wrong():
    lean, _ = _pair(dtype=torch.float64)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(lean(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
