"""The long-tailed protocol (docs/long_tailed.md): class counts, the split, head / medium / tail and
logit-adjusted accuracy, SeMi's entropy hard-example weight, and the run end to end."""
import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

import config
import data
import evaluate
import losses
import methods
import train
from conftest import drop, lt_args, tiny_args

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- counts and split

def test_counts_are_the_spec_lists():
    c10 = data.lt_counts(1500, 100, 10)
    assert c10 == [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15] and sum(c10) == 3720
    assert sum(data.lt_counts(3000, 100, 10)) == 7443
    assert sum(data.lt_counts(150, 10, 100)) == 5835
    assert sum(data.lt_counts(300, 10, 100)) == 11720
    assert data.lt_counts(3000, -100, 10) == data.lt_counts(3000, 100, 10)[::-1]
    assert data.lt_counts(300, 1, 7) == [300] * 7


@pytest.mark.parametrize("n1, gamma, k", [(1500, 100, 10), (150, 10, 100), (3000, 100, 10),
                                          (1000, 7, 5), (500, 50, 20)])
def test_counts_follow_the_formula_and_the_last_class_is_exact(n1, gamma, k):
    c = data.lt_counts(n1, gamma, k)
    for i in range(k - 1):  # written out with decimal-safe arithmetic
        assert abs(c[i] - n1 * gamma ** (-i / (k - 1))) < 1 and c[i] <= n1 * gamma ** (-i / (k - 1)) + 1e-6
    assert c[-1] == n1 // gamma  # 1500 / 100 must give 15, never 14


def lt_labels(per_class=500, k=10, seed=0):
    y = np.repeat(np.arange(k), per_class)
    np.random.default_rng(seed).shuffle(y)
    return y


def test_split_counts_disjoint_and_seeded():
    y = lt_labels()
    lb, ulb = data.split_long_tailed(y, 100, 400, 10, 10, seed=0, num_classes=10)
    assert np.bincount(y[lb], minlength=10).tolist() == data.lt_counts(100, 10, 10)
    assert np.bincount(y[ulb], minlength=10).tolist() == data.lt_counts(400, 10, 10)
    assert len(set(lb.tolist()) | set(ulb.tolist())) == len(lb) + len(ulb)  # unique, disjoint
    assert lb.min() >= 0 and ulb.max() < len(y)
    lb2, ulb2 = data.split_long_tailed(y, 100, 400, 10, 10, seed=0, num_classes=10)
    assert np.array_equal(lb, lb2) and np.array_equal(ulb, ulb2)
    lb3, ulb3 = data.split_long_tailed(y, 100, 400, 10, 10, seed=1, num_classes=10)
    assert not np.array_equal(lb, lb3)
    assert np.bincount(y[lb3], minlength=10).tolist() == np.bincount(y[lb], minlength=10).tolist()
    lb_r, ulb_r = data.split_long_tailed(y, 100, 400, 10, -10, seed=0, num_classes=10)
    assert np.array_equal(lb_r, lb)  # reversing changes only the unlabeled counts
    assert np.bincount(y[ulb_r], minlength=10).tolist() == data.lt_counts(400, 10, 10)[::-1]


def test_infeasible_split_is_one_line(tiny_npz, tmp_path):
    with pytest.raises(ValueError, match="class 0 has 500 training images, fewer than the 1500"):
        data.split_long_tailed(lt_labels(), 1500, 3000, 100, 100, seed=0, num_classes=10)
    with pytest.raises(SystemExit) as e:
        train.main(drop(lt_args(tiny_npz, tmp_path / "r"), "--lt-labeled") + ["--lt-labeled", "15"])
    assert "fewer than the 15 labeled + 10 unlabeled" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bad", [["--lt-labeled", "6"], ["--lt-labeled", "6", "--lt-unlabeled", "5"],
                                 ["--lt-labeled", "6", "--lt-unlabeled", "5", "--imb-ratio-l", "0.5"],
                                 ["--lt-labeled", "6", "--lt-unlabeled", "5", "--imb-ratio-l", "3",
                                  "--labels-per-class", "2"]])
def test_long_tailed_flags_go_together(tiny_npz, tmp_path, capsys, bad):
    with pytest.raises(SystemExit):
        config.get_args(drop(tiny_args(tiny_npz, tmp_path / "r"), "--labels-per-class") + bad)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and ("long-tailed" in err or "imb-ratio" in err)


# ---------------------------------------------------------------- metrics

def test_groups_cover_every_class_once_by_labeled_count():
    counts = [5, 50, 20, 20, 1, 7, 9]
    g = evaluate.class_groups(counts)
    assert g == {"head": [1, 2, 3], "medium": [6], "tail": [5, 0, 4]}  # ties by class index
    assert sorted(sum(g.values(), [])) == list(range(7))
    g10 = evaluate.class_groups(data.lt_counts(1500, 100, 10))
    assert [len(v) for v in g10.values()] == [4, 2, 4] and g10["head"] == [0, 1, 2, 3]


def test_logit_adjustment_by_hand():
    scores = torch.tensor([[2.0, 1.5], [0.1, 0.0]])
    y = torch.tensor([1, 0])
    counts = [90, 10]  # class 1 is the tail: log(0.9) - log(0.1) = 2.197 > 0.5
    m = evaluate.eval_metrics(scores, y, counts, tau=1.0)
    assert m["test_acc"] == 0.5 and m["per_class_acc"] == [1.0, 0.0]
    assert m["per_class_acc_adjusted"] == [0.0, 1.0]  # the tail wins after adjustment ...
    assert m["tail_acc_adjusted"] == 1.0 and m["head_acc_adjusted"] == 0.0  # ... on both rows
    same = evaluate.eval_metrics(scores, y, counts, tau=0.0)
    assert same["per_class_acc_adjusted"] == same["per_class_acc"]
    uniform = evaluate.eval_metrics(scores, y, [10, 10], tau=1.0)
    assert uniform["per_class_acc_adjusted"] == uniform["per_class_acc"]


def test_oheml_weight():
    k = 5
    one_hot = torch.eye(k)[:2]
    uniform = torch.full((1, k), 1 / k)
    assert losses.oheml_weight(one_hot, 0.75).tolist() == pytest.approx([0.25, 0.25])
    assert losses.oheml_weight(uniform, 0.75).item() == pytest.approx(1.0)
    p = torch.softmax(torch.linspace(0, 1, k)[None] * torch.tensor([[8.0], [4.0], [2.0], [0.5]]), 1)
    w = losses.oheml_weight(p, 0.75)
    h = -(p * p.log()).sum(1)
    assert (torch.diff(h) > 0).all() and (torch.diff(w) > 0).all()  # monotone in H
    assert w.tolist() == pytest.approx((0.75 * h / math.log(k) + 0.25).tolist())
    with pytest.raises(ValueError):
        losses.oheml_weight(uniform, 1.5)


# ---------------------------------------------------------------- end to end

def test_long_tailed_run_end_to_end(tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "r"
    run = train.Run(config.get_args(lt_args(tiny_npz, out, "--imb-ratio-u", "-3")))
    y = run.y_train.numpy()
    assert np.bincount(y[run.labeled_idx]).tolist() == [6, 3, 2]
    assert np.bincount(y[run.unlabeled_idx]).tolist() == [3, 5, 10]  # reversed
    y_drawn = torch.cat([run.batch()[3] for _ in range(9)])  # 9 x mu B = 72 = 4 passes of 18
    for i in range(4):  # each pass over the unlabeled stream holds the LT unlabeled classes
        assert np.bincount(y_drawn[18 * i:18 * (i + 1)].numpy()).tolist() == [3, 5, 10]
    res = train.main(lt_args(tiny_npz, out, "--imb-ratio-u", "-3"))
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    for m in lines + [res["final"]]:
        for field in ("head_acc", "medium_acc", "tail_acc", "test_acc_adjusted", "tail_acc_adjusted",
                      "per_class_acc"):
            assert field in m
    state = torch.load(out / "last.pt", weights_only=True)
    assert set(state["unlabeled_idx"].tolist()) == set(run.unlabeled_idx.tolist())
    assert res["labeled_counts"] == [6, 3, 2]


def test_hard_weight_starts_after_5_epochs_and_only_for_the_peers(tiny_npz, tmp_path, monkeypatch,
                                                                   capsys):
    calls = []
    real = losses.oheml_weight
    monkeypatch.setattr(losses, "oheml_weight", lambda p, s, **k: calls.append(s) or real(p, s, **k))
    args = drop(tiny_args(tiny_npz, tmp_path / "r", "--loss", "fixmatch", "--hard-weight", "0.75",
                          "--epochs", "7", "--steps-per-epoch", "1"), "--entropy-ratio")
    train.main(args)
    assert calls == [0.75, 0.75]  # epochs 5 and 6 (0-based): after 5 epochs
    with pytest.raises(SystemExit):
        config.get_args(tiny_args(tiny_npz, tmp_path / "b", "--hard-weight", "0.5"))
    assert "applies to --loss fixmatch" in capsys.readouterr().err


def test_hard_weight_multiplies_each_masked_term():
    from test_methods import Args, make_out
    o, a = make_out(n_strong=1), Args()
    a.hard_weight = 0.75
    loss, diag, _ = methods.fixmatch_step(o, None, a, step=5)
    p = torch.softmax(o.logits_w.double(), 1)
    conf, pl = p.max(1)
    w = (conf >= a.threshold).double() * (0.75 * -(p * p.log()).sum(1) / math.log(p.shape[1]) + 0.25)
    ce = torch.nn.functional.cross_entropy(o.logits_s[0].double(), pl, reduction="none")
    ref = torch.nn.functional.cross_entropy(o.logits_lb.double(), o.y_lb) + (w * ce).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert dict(zip(methods.DIAG, diag.tolist()))["weight_sum"] == pytest.approx(w.sum().item())


def test_run_lt_dry_run_lists_every_setting_and_method(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT_DIR=str(tmp_path / "my lt"), METHODS="entropy fixmatch",
               HARD_WEIGHT="0.75", SEEDS="0 1", PYTHON=sys.executable)
    p = subprocess.run(["bash", os.path.join(HERE, "run_lt.sh")], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0, p.stderr
    cmds = [shlex.split(l) for l in p.stdout.strip().splitlines()]
    assert len(cmds) == 2 * 3 * 2 + 1 and cmds[-1][1:3] == [os.path.join(HERE, "evaluate.py"), "--lt-table"]
    settings = {(c[c.index("--dataset") + 1], c[c.index("--imb-ratio-u") + 1]) for c in cmds[:-1]}
    assert settings == {("cifar10", "100"), ("cifar10", "-100"), ("cifar100", "10")}
    for c in cmds[:-1]:
        assert c[c.index("--mu") + 1] == "2" and c[c.index("--out") + 1].startswith(str(tmp_path))
        assert ("--hard-weight" in c) == (c[c.index("--loss") + 1] == "fixmatch")
        assert ("--entropy-ratio" in c) == (c[c.index("--loss") + 1] == "entropy")
