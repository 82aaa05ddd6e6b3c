"""Issue-9 fidelity rules: defaults that match [G]'s final configuration, evaluation in float32,
the AMP precision decision, and which resumes are allowed."""
import pytest
import torch

import config
import evaluate
import train
from conftest import tiny_args
from model import Encoder


def _first_step(args):
    run = train.Run(config.get_args(args))
    grads = {}
    real = run.opt.step
    run.opt.step = lambda *a, **k: grads.update(
        {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}) or real()
    run.train_step()
    return run, run.stats[0].item(), grads


def test_defaults_train_as_g_final_configuration(tiny_npz, tmp_path):
    """The defaults train exactly as [G]'s final configuration given explicitly (T_pl 0.08 on the
    cosine = configD's 0.04 on (cos + 1) / 2, T 0.1, lambda 0.2, USB's WRN): the same first step,
    bit for bit, while another T_pl, T or lambda changes it; and the default network is [G]'s
    (stem bias, 1,466,336 backbone parameters for WRN-28-2)."""
    mix = ["--threshold", "0.6", "--entropy-ratio", "0.9"]  # pseudo-labels of every kind at init
    run, loss, grads = _first_step(tiny_args(tiny_npz, tmp_path / "d", *mix))
    g_final = ["--pl-temp", "0.08", "--temp", "0.1", "--low-weight", "0.2", "--wrn-variant", "usb"]
    _, loss_g, grads_g = _first_step(tiny_args(tiny_npz, tmp_path / "g", *mix, *g_final))
    assert loss == loss_g and all(torch.equal(grads[n], grads_g[n]) for n in grads), \
        "the defaults do not train as [G]'s final configuration"
    for flag, value in (("--pl-temp", "0.1"), ("--temp", "0.12"), ("--low-weight", "0.3")):
        _, other, _ = _first_step(tiny_args(tiny_npz, tmp_path / flag, *mix, flag, value))
        assert other != loss, f"{flag} {value} trains like the default: the check cannot fail"
    assert run.model.backbone.stem.bias is not None
    from model import count_params
    assert count_params(Encoder(10, "wrn-28-2").backbone) == 1_466_336


class AutocastSpy(torch.nn.Module):
    """Records whether autocast was on when the class scores (and features, query.py's
    embeddings) were computed."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.lin = torch.nn.Linear(1, 2)

    def scores_and_features(self, x):
        self.seen.append(torch.is_autocast_enabled(x.device.type))
        return torch.zeros(len(x), 3), torch.zeros(len(x), 2), torch.zeros(len(x), 2)


def test_prediction_runs_without_autocast_even_inside_an_autocast_region():
    m = AutocastSpy()
    x = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        evaluate.predict_all(m, x, lambda t: t.float(), batch_size=2)
    assert m.seen == [False, False, False]


def test_prediction_is_float32_and_equals_the_plain_forward():
    torch.manual_seed(0)
    enc = Encoder(4, "wrn-10-1").eval()
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    norm = lambda t: t.float() / 255  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = evaluate.predict_all(enc, x, norm)
    with torch.no_grad():
        z, _ = enc(norm(x))
        ref = (z @ torch.nn.functional.normalize(enc.prototypes, dim=1).T).argmax(1)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_dtype_follows_native_bf16_support(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts
    assert train.amp_dtype_for(torch.device("cuda:1")) == expected
    assert asked == [torch.device("cuda:1")]  # the device given by --device, not device 0
    assert train.amp_dtype_for(torch.device("cpu")) == torch.bfloat16


def fake_checkpoint(out, **changes):
    state = torch.load(out / "last.pt", weights_only=True)
    state.update(changes)
    torch.save(state, out / "last.pt")
    (out / "result.json").unlink()


@pytest.mark.parametrize("changes, message", [
    ({"device_type": "cuda"}, "was trained on cuda and cannot resume on cpu"),
    ({"amp_dtype": "torch.float16"}, "fp16 runs keep a GradScaler state"),
])
def test_resume_refuses_another_device_type_or_fp16_change(tiny_npz, tmp_path, changes, message):
    out = tmp_path / "r"
    train.main(tiny_args(tiny_npz, out, "--epochs", "1"))
    fake_checkpoint(out, **changes)
    before = (out / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_npz, out, "--epochs", "1"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert (out / "last.pt").read_bytes() == before


def test_resume_may_switch_bf16_autocast_on_and_off(tiny_npz, tmp_path, capsys):
    out = tmp_path / "r"
    train.main(tiny_args(tiny_npz, out, "--epochs", "2", "--amp"))  # CPU bf16 autocast
    assert "amp bfloat16" in capsys.readouterr().out
    fake_checkpoint(out, step=3)  # pretend it stopped after epoch 1
    res = train.main(tiny_args(tiny_npz, out, "--epochs", "2", "--no-amp"))
    assert res["steps"] == 6 and "amp off" in capsys.readouterr().out
