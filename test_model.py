"""model.py: WRN-28-2 size and layout, unit-norm embeddings, channels_last and bf16 autocast."""
import pytest
import torch

from model import Encoder, WideResNet, count_params, parse_arch


def wrn_param_count(depth: int, width: int, stem_bias: bool) -> int:
    """WRN parameters by hand: convs, 1x1 shortcuts, BN affine pairs."""
    n = (depth - 4) // 6
    w = [16, 16 * width, 32 * width, 64 * width]
    total = 3 * 9 * 16 + (16 if stem_bias else 0)
    for g in range(3):
        for i in range(n):
            c_in = w[g] if i == 0 else w[g + 1]
            c_out = w[g + 1]
            total += 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out  # bn1 conv1 bn2 conv2
            if c_in != c_out:
                total += c_in * c_out
    return total + 2 * w[3]


def test_wrn_28_2_parameter_count():
    assert count_params(WideResNet(28, 2)) == 1_466_336 == wrn_param_count(28, 2, True)  # USB's
    assert count_params(WideResNet(28, 2, variant="tf")) == wrn_param_count(28, 2, False)
    assert count_params(WideResNet(10, 1, variant="tf")) == wrn_param_count(10, 1, False)
    enc = Encoder(10)
    assert enc.prototypes.shape == (10, 128)
    assert count_params(enc.head) == 2 * (128 * 128 + 128)


def test_block_layout():
    net = WideResNet(28, 2)
    assert len(net.blocks) == 12
    assert [b.conv2.out_channels for b in net.blocks] == [32] * 4 + [64] * 4 + [128] * 4
    assert [b.conv1.stride[0] for b in net.blocks] == [1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1]
    assert [b.activate_before_residual for b in net.blocks] == [True] + [False] * 11
    assert [b.raw_input for b in net.blocks] == [False] * 4 + [True] + [False] * 3 + [True] + [False] * 3
    assert not any(b.raw_input for b in WideResNet(28, 2, variant="tf").blocks)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.001 for m in bns)
    assert net.bn.eps == 1e-3 and all(m.eps == 1e-5 for m in bns[:-1])
    assert net.stem.bias is not None and WideResNet(28, 2, variant="tf").stem.bias is None


def manual_block(b, x, raw: bool, abr: bool):
    """A block's forward written out: raw input (USB, first block of groups 2/3) or pre-activated."""
    a = x if raw else torch.nn.functional.leaky_relu(b.bn1(x), 0.1)
    short = a if abr else x
    o = b.conv2(torch.nn.functional.leaky_relu(b.bn2(b.conv1(a)), 0.1))
    return (short if b.shortcut is None else b.shortcut(short)) + o


@pytest.mark.parametrize("variant", ["usb", "tf"])
def test_first_block_of_groups_2_and_3_sees_the_raw_input_in_usb(variant):
    torch.manual_seed(0)
    net = WideResNet(16, 1, variant=variant).eval()
    for m in net.modules():  # BN statistics away from identity, so that skipping bn1 shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    h = net.stem(x)
    with torch.no_grad():
        for j, b in enumerate(net.blocks):
            raw = variant == "usb" and j in (2, 4)  # n = 2 blocks per group
            ref = manual_block(b, h, raw, abr=(j == 0))
            torch.testing.assert_close(b(h), ref)
            if j in (2, 4):  # and the other form really differs
                assert (manual_block(b, h, not raw, abr=False) - ref).abs().max() > 1e-3
            h = ref


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
