import pytest
import torch

from ddpm_core.unet import UNet, sinusoidal_embedding


def randomized(model: UNet) -> UNet:
    """Zero-initialised output layers make a fresh net output 0; perturb them for tests."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("channels,blocks", [([16], 1), ([16, 32], 1), ([16, 32, 64], 2)])
def test_output_shape_matches_input(channels, blocks):
    model = UNet(channels, blocks, attention_heads=2)
    x = torch.randn(3, 1, 28, 28)
    assert model(x, torch.tensor([0, 500, 999])).shape == x.shape


def test_patch_size_2_runs_the_network_at_14_pixels():
    model = randomized(UNet([16, 32], attention_heads=2, num_classes=10, patch_size=2))
    seen = []
    model.mid_attn.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape))
    x = torch.randn(3, 1, 28, 28)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == x.shape
    assert seen == [torch.Size([3, 32, 7, 7])]  # 28 → 14 (the 2×2 fold) → 7
    assert model.inp.in_channels == 4 and model.out[-1].out_channels == 4
    # each output pixel is one of the four folded channels, put back where it came from
    assert torch.equal(model.unfold(model.fold(x)), x)


def test_patch_size_1_keeps_the_parameter_names_of_earlier_checkpoints():
    names = set(UNet([16, 32], num_classes=10).state_dict())
    assert {"inp.weight", "out.2.weight"} <= names
    assert not any(name.startswith(("fold", "unfold")) for name in names)  # the folds have no weights


@pytest.mark.parametrize("patch_size", [1, 2])
def test_fresh_model_predicts_zero_noise(patch_size):
    model = UNet([16, 32], num_classes=10, patch_size=patch_size)
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert torch.count_nonzero(out) == 0


def test_conditional_model_with_and_without_labels():
    model = randomized(UNet([16, 32], attention_heads=2, num_classes=10))
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([10, 10])
    assert model(x, t, torch.tensor([3, 7])).shape == x.shape
    # No labels means the null class.
    assert torch.equal(model(x, t), model(x, t, torch.full((2,), model.null_class)))
    # Labels change the prediction.
    assert not torch.allclose(model(x, t, torch.tensor([3, 3])), model(x, t, torch.tensor([7, 7])))


def test_null_class_is_an_extra_learned_embedding():
    model = UNet([16, 32], num_classes=10)
    assert model.null_class == 10
    assert model.class_emb.num_embeddings == 11
    assert model.class_emb.weight.requires_grad


def test_unconditional_model_has_no_class_embedding():
    model = UNet([16, 32])
    assert model.class_emb is None
    with pytest.raises(AttributeError):
        _ = model.null_class


def test_timestep_changes_the_prediction():
    model = randomized(UNet([16, 32], attention_heads=2))
    x = torch.randn(1, 1, 28, 28)
    assert not torch.allclose(model(x, torch.tensor([0])), model(x, torch.tensor([999])))


def test_sinusoidal_embedding_closed_form():
    emb = sinusoidal_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10_000.0)) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)]))
