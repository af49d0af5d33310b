"""timm's model contract, over every registered biformer model (reduced sizes where needed)."""
import pytest
import timm
import torch

import biformer  # noqa: F401  (registers the models)

MODELS = timm.list_models("biformer_*")
SMALL_INPUT = (2, 3, 64, 64)


def test_all_variants_registered():
    assert set(MODELS) == {"biformer_tiny", "biformer_small", "biformer_base", "biformer_stl", "biformer_stl_nchw", "biformer_nano",
                           "biformer_stl_nano"}


@pytest.fixture(scope="module", params=MODELS)
def model_name(request):
    return request.param


@pytest.fixture(scope="module")
def model(model_name):
    torch.manual_seed(0)
    return timm.create_model(model_name, num_classes=7).eval()


def test_forward_backward_every_parameter_gets_a_gradient(model):
    model.train()
    try:
        out = model(torch.randn(SMALL_INPUT))
        assert out.shape == (2, 7) and torch.isfinite(out).all()
        out.logsumexp(-1).sum().backward()
        no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_grad_checkpointing_gives_equal_output(model):
    x = torch.randn(SMALL_INPUT)
    with torch.no_grad():
        expected = model(x)
    model.set_grad_checkpointing(True)
    try:
        x.requires_grad_(True)
        out = model(x)
        out.sum().backward()  # checkpointed blocks recompute in backward
        torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)
        assert x.grad is not None
    finally:
        model.set_grad_checkpointing(False)
        model.zero_grad(set_to_none=True)


def test_features_only_matches_feature_info(model_name):
    features = timm.create_model(model_name, features_only=True).eval()
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 64, 96))
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [m.shape[1] for m in maps] == features.feature_info.channels()
    assert [tuple(m.shape[2:]) for m in maps] == [(64 // r, 96 // r) for r in (4, 8, 16, 32)]


def test_last_intermediate_equals_forward_features(model):
    x = torch.randn(SMALL_INPUT)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, norm=True)
        features = model.forward_features(x)
        only = model.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert len(intermediates) == 4
    torch.testing.assert_close(intermediates[-1], features, atol=0, rtol=0)
    torch.testing.assert_close(final, features, atol=0, rtol=0)
    torch.testing.assert_close(only[0], intermediates[1], atol=0, rtol=0)


def test_reset_classifier(model_name):
    model = timm.create_model(model_name, num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, model.num_features)
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (1, 5)
    assert model.get_classifier().out_features == 5


@pytest.mark.parametrize("padding", ["masked", "legacy"])
@pytest.mark.parametrize("size", [(32, 32), (64, 64), (72, 88)])
def test_any_input_size_runs(model_name, padding, size):
    model = timm.create_model(model_name, num_classes=3, padding=padding).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


@pytest.mark.slow
def test_compile_equals_eager(model_name):
    """Compiled at one block per stage (same layers, less compile time on CI)."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, depths=(1, 1, 1, 1), num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-4)


def test_timm_universal_encoder_for_segmentation():
    """smp's tu- encoder is timm's features_only model: with the same weights it gives the same four maps (after
    the input and an empty stride-2 slot, smp's convention for encoders without one)."""
    smp = pytest.importorskip("segmentation_models_pytorch", reason="SMP NOT INSTALLED: tu- encoder not checked")
    model = smp.Unet("tu-biformer_tiny", encoder_weights=None, classes=3).eval()
    features = timm.create_model("biformer_tiny", features_only=True).eval()
    features.load_state_dict(model.encoder.model.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        encoded, expected = model.encoder(x), features(x)
        assert model(x).shape == (1, 3, 64, 96)
    assert encoded[1].shape[1] == 0 and len(encoded) == 2 + len(expected)
    for got, want in zip(encoded[2:], expected):
        torch.testing.assert_close(got, want)


def test_paper_input_sizes_run_and_each_image_is_its_own():
    """At the paper's detection/segmentation-like sizes, an image's logits do not depend on the others in its
    batch (routing, padding masks and region means are per image)."""
    model = timm.create_model("biformer_tiny").eval()
    with torch.no_grad():
        for size in [(256, 320), (512, 512)]:
            images = torch.randn(2, 3, *size)
            together = model(images)
            assert together.shape == (2, 1000)
            torch.testing.assert_close(together, torch.cat([model(image[None]) for image in images]),
                                       atol=1e-4, rtol=1e-4)


def test_stl_nchw_legacy_padding_is_the_nchw_layers_own():
    """The NCHW refactor padded differently from auto_pad=True (floor-sized regions): "legacy" means its rule."""
    from biformer.ops import BiLevelRoutingAttention

    for name, expected in (("biformer_stl_nchw", "legacy_nchw"), ("biformer_stl", "legacy"), ("biformer_tiny", "legacy")):
        with torch.device("meta"):
            model = timm.create_model(name, padding="legacy")
        layers = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
        assert layers and {layer.padding for layer in layers} == {expected}, name


def test_a_stage_topk_names_full_attention_and_the_original_codes_read_as_names():
    from biformer.models.biformer import BiLevelRoutingAttention, GlobalAttention

    by_name = timm.create_model("biformer_nano", topks=(4, 4, 4, "global_value"))
    from_text = timm.create_model("biformer_nano", topks="4,4,4,global_value")  # as --model-kwargs gives it
    original = timm.create_model("biformer_nano", topks=(4, 4, 4, -1))  # the release's code for it
    for model in (by_name, from_text, original):
        assert model.topks == (4, 4, 4, "global_value")
        assert isinstance(model.stages[0].blocks[0].attn, BiLevelRoutingAttention)
        last = model.stages[3].blocks[0].attn
        assert isinstance(last, GlobalAttention) and last.lepe_on == "value"
    assert timm.create_model("biformer_nano").stages[3].blocks[0].attn.lepe_on == "input"  # global_input
    for bad in ((4, 4, 4, 0), (4, 4, 4, "global"), "4,4"):
        with pytest.raises(ValueError, match="topks"):
            timm.create_model("biformer_nano", topks=bad)
