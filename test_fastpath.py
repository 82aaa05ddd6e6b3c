"""The fast path (channels_last, torch.compile, foreach EMA) changes nothing that matters."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import config
import train
from conftest import tiny_args

HERE = os.path.dirname(os.path.abspath(__file__))


def first_step(args):
    """Loss and parameter gradients of one training step (what the optimizer receives)."""
    run = train.Run(config.get_args(args))
    grads = {}
    real = run.opt.step
    run.opt.step = lambda *a, **k: grads.update(
        {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}) or real()
    run.train_step()
    return run.stats[0].item(), grads, run


def test_channels_last_on_and_off_give_the_same_step(tiny_npz, tmp_path):
    """One step, so that a pseudo-label flipped by rounding in a later step cannot make it fail:
    the same loss and the same gradients up to the convolution algorithms' rounding."""
    loss_a, ga, run_a = first_step(tiny_args(tiny_npz, tmp_path / "a"))
    loss_b, gb, _ = first_step(tiny_args(tiny_npz, tmp_path / "b", "--no-channels-last"))
    assert run_a.model.backbone.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-6)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-3, atol=1e-5, msg=k)


def test_foreach_ema_matches_the_textbook_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(1.0)
    expected = [0.9 * e + 0.1 * p for e, p in zip(ema.parameters(), model.parameters())]
    train.ema_update(ema, model, 0.9)
    for e, x in zip(ema.parameters(), expected):
        torch.testing.assert_close(e, x)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)


def test_lr_schedule_is_fixmatch_cosine():
    assert train.lr_at(0, 100, 0.03) == 0.03
    assert abs(train.lr_at(100, 100, 0.03) - 0.03 * 0.19509032) < 1e-7  # cos(7 pi / 16)


def test_weight_decay_only_on_matrices(tiny_npz, tmp_path):
    run = train.Run(config.get_args(tiny_args(tiny_npz, tmp_path / "wd")))
    decay, no_decay = run.opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert decay["nesterov"] and decay["momentum"] == 0.9


COMPILE_CHECK = """
import json, sys, torch, config, train
from conftest import write_tiny_npz
npz = write_tiny_npz(sys.argv[1] + "/c.npz", size=8)
def losses(*extra):
    run = train.Run(config.get_args(["--dataset", "npz:" + npz, "--labels-per-class", "2",
        "--arch", "wrn-10-1", "--batch-size", "4", "--mu", "2", "--epochs", "1",
        "--steps-per-epoch", "3", "--entropy-ratio", "0.5", "--device", "cpu",
        "--out", sys.argv[1] + "/run" + "".join(extra), *extra]))
    out = []
    for _ in range(3):
        before = run.stats[0].item()
        run.train_step()
        out.append(run.stats[0].item() - before)
    return out
print(json.dumps({"eager": losses(), "compiled": losses("--compile")}))
"""


def test_compile_gives_the_eager_losses(tmp_path):
    """torch.compile (inductor, C++ on CPU) on the smallest model and 8 x 8 images: the same
    three training-step losses as eager mode. In a subprocess, so that dynamo's state does not
    leak into other tests; about 25-50 s on 2 cores, so it runs in CI rather than skipping."""
    p = subprocess.run([sys.executable, "-c", COMPILE_CHECK, str(tmp_path)], capture_output=True,
                       text=True, timeout=400, cwd=HERE)
    assert p.returncode == 0, p.stderr[-2000:]
    vals = json.loads(p.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(vals["compiled"]), torch.tensor(vals["eager"]),
                               rtol=1e-4, atol=1e-5)
