"""methods.py: the wiring of each method's training step (which view feeds which term), SimMatch's
state, the peer methods end to end with exact resume, and their command-line rules."""
import json
import math
import os
import random
import signal

import pytest
import torch
import torch.nn.functional as F

import config
import evaluate
import losses
import methods
import train
from conftest import tiny_args
from model import Encoder
from test_reliability import assert_same_state, final_state, run_cli

K, B, U, D = 5, 6, 8, 16


class Args:
    """The method flags a step reads, at train.py's defaults."""
    loss, threshold, pl_temp, temp, low_weight = "entropy", 0.95, 0.08, 0.1, 0.2
    entropy_ratio, entropy_weighting, pair_weight = 0.3, "exp", "geometric"
    lambda_u, lambda_c, ccssl_temp, lambda_in = 1.0, 1.0, 0.07, 1.0
    bank_momentum, bank_temp, smoothing_alpha, da_len, hard_weight = 0.7, 0.1, 0.9, 3, 0.0
    entropy_epochs, steps_per_epoch = 1, 1  # step 0: entropy selection on


def make_out(n_strong=2, seed=0, logits=True, sharp=8.0) -> methods.Out:
    g = torch.Generator().manual_seed(seed)
    z = lambda n: F.normalize(torch.randn(n, D, generator=g), dim=1)  # noqa: E731
    lg = lambda n: torch.randn(n, K, generator=g) * sharp if logits else None  # noqa: E731
    return methods.Out(z(B), z(U), [z(U) for _ in range(n_strong)], lg(B), lg(U),
                       [lg(U) for _ in range(n_strong)],
                       torch.randint(0, K, (B,), generator=g), torch.randint(0, 4, (B,), generator=g),
                       torch.randint(0, K, (U,), generator=g))


class ProtoModel(torch.nn.Module):
    def __init__(self, protos):
        super().__init__()
        self.prototypes = torch.nn.Parameter(protos)


# ---------------------------------------------------------------- [G] / [N&O] step wiring

@pytest.mark.parametrize("loss", ["base", "entropy"])
def test_contrastive_step_wiring(monkeypatch, loss):
    """Pseudo-labels from the weak view; rows [prototypes 0..K-1; labeled (true labels); strong 1;
    strong 2], the two strong views sharing labels and weights."""
    torch.manual_seed(1)
    o = make_out(logits=False)
    # prototypes next to some weak embeddings, so that confident and selected rows both occur
    model = ProtoModel(torch.cat([o.z_w[:3] * 5, torch.randn(K - 3, D)]))
    a = Args()
    a.loss = loss
    seen = {}
    real_probs = losses.prototype_probs

    def spy_probs(z, protos, t):
        seen["z"], seen["t"] = z, t
        return real_probs(z, protos, t)

    def spy_loss(feats, labels, weights, temp, validate=True, **kw):
        seen.update(feats=feats, labels=labels, weights=weights)
        return feats.sum() * 0

    monkeypatch.setattr(losses, "prototype_probs", spy_probs)
    monkeypatch.setattr(losses, "anchor_weighted_supcon", spy_loss)
    monkeypatch.setattr(losses, "pair_weighted_supcon", spy_loss)
    methods.contrastive_step(o, model, a)
    assert torch.equal(seen["z"], o.z_w) and seen["t"] == a.pl_temp
    q = real_probs(o.z_w, model.prototypes, a.pl_temp)
    pl, pw = losses.assign_pseudo_labels(q, a.threshold, a.entropy_ratio if loss == "entropy" else
                                         None, a.low_weight)
    feats, labels, weights = seen["feats"], seen["labels"], seen["weights"]
    torch.testing.assert_close(feats, torch.cat([model.prototypes.detach(), o.z_lb, *o.z_s]))
    assert labels.tolist() == list(range(K)) + o.y_lb.tolist() + pl.tolist() + pl.tolist()
    torch.testing.assert_close(weights, torch.cat([torch.ones(K + B), pw, pw]))
    assert (pl < K).any() and (pl >= K).any()  # both kinds of rows took part


def test_entropy_selection_switches_off_exactly_at_entropy_epochs(tiny_npz, tmp_path, monkeypatch):
    calls = []
    real = losses.assign_pseudo_labels

    def spy(probs, threshold, entropy_ratio, *rest, **kw):
        calls.append(entropy_ratio)
        return real(probs, threshold, entropy_ratio, *rest, **kw)

    monkeypatch.setattr(losses, "assign_pseudo_labels", spy)
    train.main(tiny_args(tiny_npz, tmp_path / "r", "--epochs", "3", "--entropy-epochs", "2"))
    assert calls == [0.5] * 6 + [None] * 3  # 3 steps per epoch


def test_pair_weight_reaches_the_loss(monkeypatch):
    seen = []
    monkeypatch.setattr(losses, "pair_weighted_supcon",
                        lambda *x, pair="geometric", **kw: seen.append(pair) or torch.zeros(()))
    a = Args()
    o = make_out(logits=False)
    for pw in ("geometric", "product"):
        a.pair_weight = pw
        methods.contrastive_step(o, ProtoModel(torch.randn(K, D)), a)
    assert seen == ["geometric", "product"]


# ---------------------------------------------------------------- peer steps against float64 by hand

def ce64(logits, target_probs):
    """Soft cross-entropy per row, float64, written out."""
    out = []
    for lg, t in zip(logits.double(), target_probs.double()):
        lse = math.log(sum(math.exp(v) for v in lg.tolist()))
        out.append(-sum(ti * (li - lse) for ti, li in zip(t.tolist(), lg.tolist())))
    return torch.tensor(out, dtype=torch.float64)


def fixmatch64(o, a):
    p = torch.softmax(o.logits_w.double(), 1)
    conf, pl = p.max(1)
    mask = (conf >= a.threshold).double()
    lx = ce64(o.logits_lb, F.one_hot(o.y_lb, K)).mean()
    lu = (mask * ce64(o.logits_s[0], F.one_hot(pl, K))).sum() / U
    return lx + a.lambda_u * lu, pl, conf, mask


def test_fixmatch_step_is_the_textbook_loss():
    o, a = make_out(n_strong=1), Args()
    loss, diag, _ = methods.fixmatch_step(o, None, a)
    ref, pl, _, mask = fixmatch64(o, a)
    assert 0 < mask.sum() < U  # both masked and unmasked samples
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    d = dict(zip(methods.DIAG, diag.tolist()))
    assert d["n_ulb"] == U and d["confident"] == mask.sum() and d["unconfident"] == U - mask.sum()
    assert d["correct_confident"] == ((pl == o.y_ulb).double() * mask).sum()


def test_ccssl_step_adds_the_class_aware_term_on_both_strong_views():
    o, a = make_out(n_strong=2), Args()
    a.lambda_c = 0.5
    loss, _, _ = methods.ccssl_step(o, None, a)
    ref, pl, conf, _ = fixmatch64(o, a)
    l_c = losses.ccssl_supcon(torch.cat(o.z_s), pl, conf.float(), a.ccssl_temp)
    torch.testing.assert_close(loss.double(), ref + 0.5 * l_c.double(), rtol=1e-5, atol=1e-6)


def simmatch64(o, a, bank, bank_labels, queue, epoch):
    """SimMatch's step from docs/peers.md, written with loops in float64. Returns loss and new bank."""
    p_w = torch.softmax(o.logits_w.double(), 1)
    queue = queue + [p_w.mean(0)]
    queue = queue[-a.da_len:]
    p_w = p_w / K / torch.stack(queue).mean(0)
    p_w = p_w / p_w.sum(1, keepdim=True)
    bank = bank.double()
    L = len(bank)
    p_hat = torch.zeros(U, K, dtype=torch.float64)
    q_hat = torch.zeros(U, L, dtype=torch.float64)
    for b in range(U):
        s = [math.exp(float(o.z_w[b].double() @ bank[j]) / a.bank_temp) for j in range(L)]
        q = [v / sum(s) for v in s]
        un = [q[j] * float(p_w[b, bank_labels[j]]) for j in range(L)]
        q_hat[b] = torch.tensor([v / sum(un) for v in un])
        agg = [sum(q[j] for j in range(L) if bank_labels[j] == k) for k in range(K)]
        p_hat[b] = a.smoothing_alpha * p_w[b] + (1 - a.smoothing_alpha) * torch.tensor(agg)
    if epoch == 0:
        p_hat = p_w
    mask = (p_hat.max(1).values >= a.threshold).double()
    lx = ce64(o.logits_lb, F.one_hot(o.y_lb, K)).mean()
    lu = (mask * ce64(o.logits_s[0], p_hat)).mean()
    l_in = ce64(o.z_s[0].double() @ bank.T / a.bank_temp, q_hat).mean() * (epoch > 0)
    new = bank.clone()
    for i in set(o.pos_lb.tolist()):
        zs = [o.z_lb[j].double() for j in range(B) if o.pos_lb[j] == i]
        m = a.bank_momentum * bank[i] + (1 - a.bank_momentum) * sum(zs) / len(zs)
        new[i] = m / m.norm()
    return lx + a.lambda_u * lu + a.lambda_in * l_in, new, queue, mask


@pytest.mark.parametrize("epoch", [0, 3])
def test_simmatch_step_bank_and_queue_against_loops(epoch):
    a = Args()
    a.threshold = 0.6
    g = torch.Generator().manual_seed(5)
    y_bank = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])  # positions 0..3 are drawn, with repeats
    state = methods.SimMatchState(y_bank, K, D, a.da_len, g)
    bank0 = state.bank.clone()
    queue = []
    for step in range(5):  # past the queue length, so the FIFO wraps around
        o = make_out(n_strong=1, seed=step, sharp=3.0)
        o.pos_lb = torch.tensor([0, 1, 1, 2, 3, 3])
        ref, bank_ref, queue, mask = simmatch64(o, a, state.bank.clone(), y_bank.tolist(), queue,
                                                epoch)
        loss, diag, _ = methods.simmatch_step(o, None, a, step=epoch, state=state)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state.bank.double(), bank_ref, rtol=1e-5, atol=1e-6)
        assert dict(zip(methods.DIAG, diag.tolist()))["confident"] == mask.sum()
    assert torch.equal(state.bank[4:], bank0[4:])  # never drawn: untouched


def test_simmatch_state_round_trips_through_a_checkpoint():
    g = torch.Generator().manual_seed(0)
    s = methods.SimMatchState(torch.arange(4), 4, 8, 2, g)
    s.align(torch.softmax(torch.randn(3, 4), 1))
    s.update(torch.tensor([1, 1]), F.normalize(torch.randn(2, 8), dim=1), 0.7)
    t = methods.SimMatchState(torch.arange(4), 4, 8, 2, torch.Generator().manual_seed(1))
    t.load_state_dict(s.state_dict())
    p = torch.softmax(torch.randn(3, 4), 1)
    assert torch.equal(s.align(p), t.align(p)) and torch.equal(s.bank, t.bank)


# ---------------------------------------------------------------- end to end

PEER_ARGS = lambda npz, out, loss, *x: [a for a in tiny_args(npz, out, "--loss", loss, *x)  # noqa
                                        if a not in ("--entropy-ratio", "0.5")]


@pytest.mark.parametrize("loss", ["fixmatch", "ccssl", "simmatch"])
def test_peer_runs_end_to_end_and_evaluate_agrees(tiny_npz, tmp_path, loss):
    out = tmp_path / loss
    res = train.main(PEER_ARGS(tiny_npz, out, loss))
    ckpt = final_state(out)
    assert any(k.startswith("classifier.") for k in ckpt["ema"]) and "prototypes" not in ckpt["ema"]
    assert (ckpt["method_state"] != {}) == (loss == "simmatch")
    m = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert len(m) == 2 and all(0 <= r["confident"] <= 1 and r["entropy_selected"] == 0 for r in m)
    assert (m[-1]["pl_acc_p_hat"] is not None) == (loss == "simmatch")
    r = evaluate.evaluate_checkpoint(str(out))
    assert abs(r["top1"] - res["final_acc"]) < 1e-6  # classifier argmax, same as in training


def test_classifier_prediction_is_the_logit_argmax():
    enc = Encoder(4, "wrn-10-1", classifier=True).eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        _, logits = enc(x)
    assert enc.predict(x).tolist() == logits.argmax(1).tolist() and enc.prototypes is None


@pytest.mark.parametrize("loss", ["fixmatch", "ccssl", "simmatch", "base", "semi"])
def test_peer_kill_and_resume_is_bitwise_exact(tiny_npz, tmp_path, loss):
    """The reliability test's SIGKILL-and-resume for the other methods (one kill point each;
    test_reliability.py covers --loss entropy at three). SeMi: every part on from epoch 1, the
    bank decayed every 2 steps, so the kill falls inside its active state."""
    extra = ["--epochs", "3", "--steps-per-epoch", "4", "--save-every", "1"]
    if loss == "semi":
        extra += ["--semi-start-epoch", "1", "--semi-decay-step", "2"]
    args = lambda out: PEER_ARGS(tiny_npz, out, loss, *extra)  # noqa: E731
    rc, log = run_cli(args(tmp_path / "ref"))
    assert rc == 0, log
    k = random.Random(loss).randrange(2, 11)
    rc, log = run_cli(args(tmp_path / "killed"), kill_after_step=k)
    assert rc == -signal.SIGKILL, log
    rc, log = run_cli(args(tmp_path / "killed"))
    assert rc == 0 and "resumed from" in log, log
    ref, got = final_state(tmp_path / "ref"), final_state(tmp_path / "killed")
    assert_same_state(ref, got)
    for key in ref["method_state"]:
        assert torch.equal(ref["method_state"][key], got["method_state"][key]), key


# ---------------------------------------------------------------- command line

@pytest.mark.parametrize("loss, flag", [
    ("fixmatch", ["--lambda-c", "2"]), ("base", ["--pair-weight", "product"]),
    ("fixmatch", ["--pl-temp", "0.1"]), ("entropy", ["--lambda-u", "1"]),
    ("ccssl", ["--bank-momentum", "0.6"]), ("simmatch", ["--ccssl-temp", "0.1"]),
    ("mixmatch", []),
])
def test_flags_of_another_method_are_errors(tiny_npz, tmp_path, capsys, loss, flag):
    with pytest.raises(SystemExit):
        config.get_args(PEER_ARGS(tiny_npz, tmp_path / "x", loss, *flag))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in err and ("applies to" in err or "invalid choice" in err)


def test_method_defaults_and_none_elsewhere(tiny_npz, tmp_path):
    a = config.get_args(PEER_ARGS(tiny_npz, tmp_path / "x", "simmatch"))
    assert (a.lambda_in, a.bank_momentum, a.smoothing_alpha, a.da_len) == (1.0, 0.7, 0.9, 32)
    assert a.pl_temp is None and a.lambda_c is None and a.pair_weight is None
    a = config.get_args(tiny_args(tiny_npz, tmp_path / "y"))
    assert a.pair_weight == "geometric" and a.lambda_u is None


def test_resuming_with_another_method_is_refused(tiny_npz, tmp_path, capsys):
    out = tmp_path / "r"
    train.main(PEER_ARGS(tiny_npz, out, "fixmatch"))
    before = (out / "last.pt").read_bytes()
    os.remove(out / "result.json")
    with pytest.raises(SystemExit) as e:
        train.main(PEER_ARGS(tiny_npz, out, "simmatch"))
    assert "loss: checkpoint 'fixmatch', now 'simmatch'" in str(e.value)
    assert (out / "last.pt").read_bytes() == before


# ---------------------------------------------------------------- no host sync in the step

class HostSync(Exception):
    pass


def forbid_host_sync(monkeypatch):
    """Make every Tensor -> Python read-back (and boolean-mask indexing, whose output size needs
    one) raise: what would be a device->host sync on a GPU."""
    def boom(name):
        def f(*a, **k):
            raise HostSync(name)
        return f
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom(name))
    getitem = torch.Tensor.__getitem__

    def checked(self, idx):
        for i in idx if isinstance(idx, tuple) else (idx,):
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                raise HostSync("boolean mask indexing")
        return getitem(self, idx)
    monkeypatch.setattr(torch.Tensor, "__getitem__", checked)


@pytest.mark.parametrize("loss", list(methods.STEPS))
def test_method_steps_read_nothing_back_to_the_host(tiny_npz, tmp_path, monkeypatch, loss):
    args = (tiny_args(tiny_npz, tmp_path / "r", "--loss", loss) if loss == "entropy"
            else PEER_ARGS(tiny_npz, tmp_path / "r", loss))
    run = train.Run(config.get_args(args))
    real = run.step_fn
    calls = []

    def guarded(*a, **k):
        with pytest.MonkeyPatch.context() as mp:
            forbid_host_sync(mp)
            calls.append(1)
            return real(*a, **k)
    run.step_fn = guarded
    for _ in range(4):  # SimMatch: epoch 0 and 1 (3 steps per epoch) take different branches
        run.train_step()
    assert len(calls) == 4
    # the guard itself works
    with pytest.MonkeyPatch.context() as mp:
        forbid_host_sync(mp)
        with pytest.raises(HostSync):
            torch.ones(2)[torch.tensor([True, False])]
