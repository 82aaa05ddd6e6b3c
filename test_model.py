"""model.py: WRN-28-2 size and layout, unit-norm embeddings, channels_last and bf16 autocast."""
import pytest
import torch

from model import Encoder, WideResNet, count_params, parse_arch


def test_wrn_28_2_parameter_count():
    n = count_params(WideResNet(28, 2))
    assert abs(n - 1.47e6) < 0.01e6, n  # FixMatch's WRN-28-2: 1.47 M
    enc = Encoder(10)
    assert enc.prototypes.shape == (10, 128)
    assert count_params(enc.head) == 2 * (128 * 128 + 128)


def test_block_layout():
    net = WideResNet(28, 2)
    assert len(net.blocks) == 12
    assert [b.conv2.out_channels for b in net.blocks] == [32] * 4 + [64] * 4 + [128] * 4
    assert [b.conv1.stride[0] for b in net.blocks] == [1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1]
    assert [b.activate_before_residual for b in net.blocks] == [True] + [False] * 11
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.001 for m in bns)


@pytest.mark.parametrize("arch", ["wrn-10-1", "wrn-28-2"])
def test_embeddings_unit_norm_channels_last_and_autocast(arch):
    torch.manual_seed(0)
    enc = Encoder(7, arch).eval()
    x = torch.randn(4, 3, 32, 32)
    z, _ = enc(x)
    assert z.shape == (4, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    enc_cl = enc.to(memory_format=torch.channels_last)
    z_cl, _ = enc_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(z_cl, z, atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_bf, _ = enc(x)
    assert torch.isfinite(z_bf).all() and (z_bf.float() - z).abs().max() < 0.1
    assert enc.predict(x).shape == (4,) and enc.predict(x).max() < 7


def test_predict_is_nearest_prototype():
    enc = Encoder(3, "wrn-10-1").eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        z, _ = enc(x)
        enc.prototypes.copy_(torch.stack([z[0], z[1], z[2]]) * 3.0)  # scale must not matter
    assert enc.predict(x[:3]).tolist() == [0, 1, 2]


@pytest.mark.parametrize("bad", ["wrn-27-2", "resnet18", "wrn-28-0", "wrn-4-1"])
def test_bad_arch(bad):
    with pytest.raises(ValueError, match="arch"):
        parse_arch(bad)
