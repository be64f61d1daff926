from pathlib import Path

import torch

from ddpm_core import hardware
from ddpm_core.unet import UNet

CPU = torch.device("cpu")


def _conv_weight(model: torch.nn.Module) -> torch.Tensor:
    return model.down[0].conv1.weight  # 16 → 16 channels: the two layouts differ


def test_fp32_on_the_cpu_is_channels_last():
    model = hardware.place_model(UNet([16, 32]), CPU, "fp32")
    weight = _conv_weight(model)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()


def test_bf16_on_the_cpu_stays_nchw():
    # GroupNorm has no fast channels-last bf16 kernel on the CPU.
    model = hardware.place_model(UNet([16, 32]), CPU, "bf16")
    assert _conv_weight(model).is_contiguous()
    assert not _conv_weight(model).is_contiguous(memory_format=torch.channels_last)


def test_layout_does_not_change_the_prediction():
    torch.manual_seed(0)
    reference = UNet([16, 32], attention_heads=2)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.05)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
    expected = reference(x, t)
    placed = hardware.place_model(reference, CPU, "fp32")
    assert torch.allclose(placed(x, t), expected, atol=1e-5)


def test_ddpm_cpu_bf16_overrides_the_detected_precision(monkeypatch):
    monkeypatch.setenv("DDPM_CPU_BF16", "0")
    assert hardware.resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setenv("DDPM_CPU_BF16", "1")
    assert hardware.resolve_precision("auto", CPU) == "bf16"
    assert hardware.resolve_precision("fp32", CPU) == "fp32"  # an explicit param still wins


def test_cpu_flags_are_read_from_the_flags_line():
    flags = hardware.cpu_flags()
    assert set(flags) <= set(hardware.DECIDING_FLAGS)
    text = Path("/proc/cpuinfo").read_text()
    line = next(line for line in text.splitlines() if line.startswith(("flags", "Features")))
    assert ("avx2" in flags) == (" avx2" in line)
