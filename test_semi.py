"""SeMi (--loss semi, docs/long_tailed.md): each term against a float64 loop reference, the
memory bank's push / replace / decay / sort on hand-made cases, the ramp and pi_hat, the step's
wiring (weak view = teacher), two-head prediction, every split mode end to end, bitwise
kill-and-resume with the bank, no host sync in the step, the command-line rules."""
import json
import math
import os
import random
import shlex
import subprocess
from types import SimpleNamespace


import pytest
import torch

import config
import evaluate
import losses
import methods
import report
import train
from conftest import drop, lt_args, tiny_args
from model import Encoder
from test_methods import forbid_host_sync
from test_reliability import assert_same_state, final_state

K, B, U, C, M = 4, 6, 8, 5, 3  # classes, labeled, unlabeled, feature dim, bank slots


# ---------------------------------------------------------------- float64 loop helpers

def softmax64(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def log_softmax64(v):
    m = max(v)
    lse = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - lse for x in v]


def ce64(logits, y):
    return -log_softmax64(logits)[y]


def argmax(v):
    return max(range(len(v)), key=lambda i: (v[i], -i))


# ---------------------------------------------------------------- losses.py terms

def test_logit_adjustment_and_bank_class_probs_against_loops():
    prior = torch.tensor([0.5, 0.3, 0.2, 0.0])
    adj = losses.logit_adjustment(prior, 2.0)
    ref = [math.log(p ** 2 + 1e-12) for p in prior.double().tolist()]
    assert torch.allclose(adj.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5)
    assert math.isfinite(adj[3].item())  # a class without labels stays finite
    g = torch.Generator().manual_seed(0)
    f, mu = torch.randn(U, C, generator=g), torch.randn(K, C, generator=g)
    got = losses.bank_class_probs(f, mu, 0.1)
    for b in range(U):
        d = [math.sqrt(sum((f[b, j].item() - mu[c, j].item()) ** 2 for j in range(C))) for c in range(K)]
        assert got[b].tolist() == pytest.approx(softmax64([-x / 0.1 for x in d]), abs=1e-5)
    with pytest.raises(ValueError, match="same D"):
        losses.bank_class_probs(f, mu[:, :2])


def test_semantic_blend_is_per_class_and_not_renormalised():
    g = torch.Generator().manual_seed(1)
    p, q = torch.softmax(torch.randn(U, K, generator=g), 1), torch.softmax(torch.randn(U, K, generator=g), 1)
    share = torch.tensor([0.7, 0.2, 0.1, 0.0])
    got = losses.semantic_blend(p, q, share, 0.4, 0.5)
    for b in range(U):
        for c in range(K):
            a_c = 0.4 * 0.5 * share[c].item()
            assert got[b, c].item() == pytest.approx((1 - a_c) * p[b, c].item() + a_c * q[b, c].item(), abs=1e-6)
    assert not torch.allclose(got.sum(1), torch.ones(U))  # SeMi's code does not renormalise
    assert torch.allclose(losses.semantic_blend(p, q, share, 0.4, 0.0), p)  # ramp 0: the teacher


def test_feature_consistency_against_loop_and_gradient_into_the_student_only():
    g = torch.Generator().manual_seed(2)
    f_w = torch.randn(U, C, generator=g, requires_grad=True)
    f_s = torch.randn(U, C, generator=g, requires_grad=True)
    center = torch.rand(C, generator=g) * 0.2
    loss, q = losses.feature_consistency(f_w, f_s, center, 0.09)
    for b in range(U):
        qb = softmax64([(f_w[b, d].item() - center[d].item()) / (0.09 / 5) for d in range(C)])
        ls = log_softmax64([f_s[b, d].item() / 0.09 for d in range(C)])
        assert loss[b].item() == pytest.approx(-sum(x * y for x, y in zip(qb, ls)), rel=1e-5, abs=1e-5)
        assert q[b].tolist() == pytest.approx(qb, abs=1e-6)
    loss.sum().backward()
    assert f_w.grad is None and f_s.grad.abs().sum() > 0


# ---------------------------------------------------------------- the bank

def state(k=K, m=M, d=C, y=None):
    y = torch.tensor([0, 0, 0, 1, 2, 2]) % k if y is None else y
    return methods.SemiState(y, k, d, m, 2.0, 2.0)


def push_ref(rows, feats, labels, conf, mask):
    """SeMi's loop: a masked candidate replaces the lowest slot of its row if strictly higher;
    the row is then sorted by confidence (Python's sort is stable). rows[k] = [(conf, feat, fresh)]."""
    for i in range(len(labels)):
        if not mask[i]:
            continue
        row = rows[labels[i]]
        if conf[i] > row[-1][0]:
            row[-1] = (conf[i], feats[i], True)
            row.sort(key=lambda t: -t[0])


def decay_ref(rows, factor):
    for k, row in enumerate(rows):
        rows[k] = sorted([(c if fr else c * factor, f, False) for c, f, fr in row], key=lambda t: -t[0])


def rows_of(s):
    return [[(s.conf[k, j].item(), s.bank[k, j].tolist(), bool(s.fresh[k, j])) for j in range(s.conf.shape[1])]
            for k in range(s.conf.shape[0])]


def assert_rows(s, rows):
    for k, row in enumerate(rows):
        assert s.conf[k].tolist() == pytest.approx([c for c, _, _ in row], abs=1e-6), k
        assert s.bank[k].flatten().tolist() == pytest.approx([x for _, f, _ in row for x in f], abs=1e-6), k
        assert s.fresh[k].tolist() == [fr for _, _, fr in row], k


def test_push_hand_made():
    s = state(k=2, m=3, d=1)
    f = lambda *v: torch.tensor(v, dtype=torch.float32)[:, None]  # noqa: E731
    # empty bank: three candidates of class 0 (one masked out), one of class 1
    s.push(f(1., 2., 3., 4.), torch.tensor([0, 0, 1, 0]), torch.tensor([.5, .9, .8, .7]),
           torch.tensor([True, True, True, False]))
    assert s.conf.flatten().tolist() == pytest.approx([.9, .5, 0., .8, 0., 0.])
    assert s.bank[:, :, 0].tolist() == [[2., 1., 0.], [3., 0., 0.]]
    assert s.fresh.tolist() == [[True, True, False], [True, False, False]]
    # full row [.9, .6, .5]: .55 replaces .5 (the lowest); .5 would not (only strictly higher);
    # .95 goes to the top and pushes .55 out again
    s.push(f(5.), torch.tensor([0]), torch.tensor([.6]), torch.tensor([True]))
    s.push(f(6., 7., 8.), torch.tensor([0, 0, 0]), torch.tensor([.55, .5, .95]),
           torch.tensor([True, True, True]))
    assert s.conf[0].tolist() == pytest.approx([.95, .9, .6])
    assert s.bank[0, :, 0].tolist() == [8., 2., 5.]
    # a candidate equal to the lowest slot does not enter (SeMi's strict >)
    s.push(f(9.), torch.tensor([0]), torch.tensor([.6]), torch.tensor([True]))
    assert s.bank[0, :, 0].tolist() == [8., 2., 5.]
    assert (s.conf[:, :-1] >= s.conf[:, 1:]).all()  # rows stay sorted


def test_decay_hand_made():
    s = state(k=1, m=3, d=1)
    s.push(torch.tensor([[1.], [2.]]), torch.tensor([0, 0]), torch.tensor([.9, .8]), torch.tensor([True, True]))
    s.decay(0.5)  # both were inserted since the last decay: untouched; the empty slot decays
    assert s.conf[0].tolist() == pytest.approx([.9, .8, 0.]) and not s.fresh.any()
    s.push(torch.tensor([[3.]]), torch.tensor([0]), torch.tensor([.6]), torch.tensor([True]))
    s.decay(0.5)  # .9 -> .45, .8 -> .4 decay; .6 is fresh and keeps its value: now on top
    assert s.conf[0].tolist() == pytest.approx([.6, .45, .4])
    assert s.bank[0, :, 0].tolist() == [3., 1., 2.]
    s.decay(0.5)
    assert s.conf[0].tolist() == pytest.approx([.3, .225, .2])


def test_push_and_decay_against_the_sequential_loop():
    g = torch.Generator().manual_seed(3)
    s = state()
    rows = rows_of(s)
    for t in range(6):
        n = 2 * U
        feats = torch.randn(n, C, generator=g)
        labels = torch.randint(0, K, (n,), generator=g)
        conf = torch.randint(1, 8, (n,), generator=g).float() / 8  # coarse: many ties
        mask = torch.rand(n, generator=g) < 0.7
        s.push(feats, labels, conf, mask)
        push_ref(rows, feats.tolist(), labels.tolist(), conf.tolist(), mask.tolist())
        assert_rows(s, rows)
        if t % 2:
            s.decay(0.9)
            decay_ref(rows, 0.9)
            assert_rows(s, rows)


def test_share_is_the_running_masked_class_share_refreshed_per_epoch():
    s = state()
    assert s.share.tolist() == [1.0] * K  # SeMi's code starts at 1 for every class
    s.count(torch.tensor([0, 1, 1, 3]), torch.tensor([False, False, False, False]), refresh=True)
    assert s.share.tolist() == [1.0] * K  # nothing masked yet: kept (SeMi's code would give 0/0)
    s.count(torch.tensor([0, 1, 1, 3]), torch.tensor([True, True, True, False]), refresh=False)
    assert s.share.tolist() == [1.0] * K  # not the end of an epoch: not refreshed
    s.count(torch.tensor([2, 1]), torch.tensor([True, True]), refresh=True)
    assert s.share.tolist() == pytest.approx([0.2, 0.6, 0.2, 0.0])  # counts 1, 3, 1, 0 since the start
    assert s.prior.tolist() == pytest.approx([0.5, 1 / 6, 1 / 3, 0.0])  # the labeled prior


def test_state_round_trips():
    s = state()
    s.push(torch.randn(4, C), torch.tensor([0, 1, 2, 3]), torch.tensor([.9, .8, .7, .6]), torch.ones(4, dtype=torch.bool))
    s.count(torch.tensor([0, 1]), torch.tensor([True, True]), refresh=True)
    t = state()
    t.load_state_dict(s.state_dict())
    for k in methods.SemiState.KEYS:
        assert torch.equal(getattr(s, k), getattr(t, k)), k
    s.push(torch.ones(1, C), torch.tensor([0]), torch.tensor([.95]), torch.ones(1, dtype=torch.bool))
    assert not torch.equal(s.bank, t.bank)  # the saved copy is not a view of the live state


# ---------------------------------------------------------------- the step against a loop

class Args:
    loss, threshold, oheml_scale, lambda_cons, cons_temp = "semi", 0.7, 0.75, 0.15, 0.09
    semi_bank_size, semi_decay, semi_decay_step, semi_proto_temp = M, 0.9, 2, 0.1
    semi_alpha, semi_ramp_epochs, semi_start_epoch = 0.4, 2, 1
    la_tau_x, la_tau_u, semi_feature, steps_per_epoch = 2.0, 2.0, "pooled", 2


MODEL = SimpleNamespace(classifier=SimpleNamespace(out_features=K))
Y_LB = torch.tensor([0, 0, 0, 1, 2, 2, 3])


def semi_out(seed):
    g = torch.Generator().manual_seed(seed)
    t = lambda n: torch.cat([torch.randn(n, 2 * K, generator=g) * 3,  # noqa: E731
                             torch.rand(n, C, generator=g)], 1).requires_grad_()
    z = lambda n: torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)  # noqa: E731
    return methods.Out(z(B), z(U), [z(U), z(U)], t(B), t(U), [t(U), t(U)],
                       torch.randint(0, K, (B,), generator=g), torch.arange(B),
                       torch.randint(0, K, (U,), generator=g))


def ref_step(o, a, st, step, prior):
    """SeMi's step in float64 loops; st = dict of python lists, updated in place."""
    L = lambda t: t.detach().double().tolist()  # noqa: E731
    lb, w_, s1, s2 = L(o.logits_lb), L(o.logits_w), L(o.logits_s[0]), L(o.logits_s[1])
    y = o.y_lb.tolist()
    adj_x = [math.log(p ** a.la_tau_x + 1e-12) for p in prior]
    adj_u = [math.log(p ** a.la_tau_u + 1e-12) for p in prior]
    loss = sum(ce64(r[:K], t) for r, t in zip(lb, y)) / B
    loss += sum(ce64([r[K + c] + adj_x[c] for c in range(K)], t) for r, t in zip(lb, y)) / B
    epoch = step // a.steps_per_epoch
    on = epoch >= a.semi_start_epoch
    rows = st["rows"]
    centre = [[sum(f[d] for _, f, _ in rows[c]) / M for d in range(C)] for c in range(K)]
    pl, conf, mask, w, pl_b, mask_b = [], [], [], [], [], []
    for b in range(U):
        p_raw = softmax64(w_[b][:K])
        p = p_raw
        if on:
            f = s1[b][2 * K:]
            dist = [math.sqrt(sum((f[d] - centre[c][d]) ** 2 for d in range(C))) for c in range(K)]
            qp = softmax64([-x / a.semi_proto_temp for x in dist])
            ramp = min(epoch / a.semi_ramp_epochs, 1.0)
            p = [(1 - a.semi_alpha * ramp * st["share"][c]) * p_raw[c]
                 + a.semi_alpha * ramp * st["share"][c] * qp[c] for c in range(K)]
        pl.append(argmax(p))
        conf.append(max(p))
        mask.append(max(p) >= a.threshold or max(p_raw) >= a.threshold)
        st["raw_only"] += max(p) < a.threshold <= max(p_raw)  # the mask's second half matters
        h = -sum(x * math.log(x) for x in p if x > 0) / math.log(K)
        w.append(a.oheml_scale * h + 1 - a.oheml_scale if on else 1.0)
        p_h2 = softmax64([w_[b][c] - adj_u[c] for c in range(K)])
        pl_b.append(argmax(p_h2))
        mask_b.append(max(p_h2) >= a.threshold or max(softmax64(w_[b][K:2 * K])) >= a.threshold)
    for view in (s1, s2):
        loss += sum(mask[b] * w[b] * ce64(view[b][:K], pl[b]) for b in range(U)) / (2 * U)
        loss += sum(mask_b[b] * ce64(view[b][K:2 * K], pl_b[b]) for b in range(U)) / (2 * U)
    if on:
        qs, cons = [], 0.0
        for b in range(U):
            q = softmax64([(w_[b][2 * K + d] - st["center"][d]) / (a.cons_temp / 5) for d in range(C)])
            qs.append(q)
            for view in (s1, s2):
                ls = log_softmax64([view[b][2 * K + d] / a.cons_temp for d in range(C)])
                cons += -sum(x * v for x, v in zip(q, ls)) * (not mask[b])
        loss += a.lambda_cons * cons / (2 * U)
        st["center"] = [0.9 * st["center"][d] + 0.1 * sum(q[d] for q in qs) / U for d in range(C)]
    for b in range(U):
        st["counts"][pl[b]] += mask[b]
    if (step + 1) % a.steps_per_epoch == 0 and sum(st["counts"]) > 0:
        st["share"] = [n / sum(st["counts"]) for n in st["counts"]]
    feats = [v[b][2 * K:] for v in (s1, s2) for b in range(U)]
    push_ref(rows, feats, pl + pl, conf + conf, mask + mask)
    if (step + 1) % a.semi_decay_step == 0:
        decay_ref(rows, a.semi_decay)
    return loss, mask, w


@pytest.fixture
def stepped():
    """Seven steps (epochs 0, 0, 1, 1, 2, 2, 3: off, then on, the blend's ramp 0.5 then capped
    at 1, pi_hat refreshed) of semi_step and the loop reference from the same state."""
    a, s = Args(), methods.SemiState(Y_LB, K, C, M, 2.0, 2.0)
    prior = (torch.bincount(Y_LB, minlength=K).double() / len(Y_LB)).tolist()
    st = {"rows": rows_of(s), "share": [1.0] * K, "counts": [0] * K, "center": [0.0] * C,
          "raw_only": 0}
    out = []
    for step in range(7):
        o = semi_out(step)
        loss, diag, _ = methods.semi_step(o, MODEL, a, step, s)
        ref, mask, w = ref_step(o, a, st, step, prior)
        out.append((o, loss, diag, s, st, ref, mask, w))
    return out


def test_semi_step_against_the_loop_reference(stepped):
    for step, (o, loss, diag, s, st, ref, mask, w) in enumerate(stepped):
        assert loss.item() == pytest.approx(ref, rel=1e-5), step
        d = dict(zip(methods.DIAG, diag.tolist()))
        assert d["confident"] == sum(mask) and d["weight_sum"] == pytest.approx(sum(m * x for m, x in zip(mask, w)), rel=1e-5)
    o, loss, diag, s, st, *_ = stepped[-1]
    assert_rows(s, st["rows"])
    assert s.share.tolist() == pytest.approx(st["share"], abs=1e-6)
    assert s.center.tolist() == pytest.approx(st["center"], abs=1e-6)
    assert 0 < sum(st["share"]) and st["share"] != [1.0] * K  # pi_hat was refreshed and used
    assert st["raw_only"] > 0  # some samples pass the mask by the raw teacher only
    assert s.hist[0].sum() == sum(sum(x[6]) for x in stepped[2:])  # OHEML weights, epochs 1-2


def test_teacher_is_the_weak_view_without_gradient(stepped):
    for o, loss, *_ in stepped[2:]:  # the terms that are on from epoch 1
        loss.backward()
        assert o.logits_w.grad is None  # head 1, head 2 and the feature of the weak view: targets only
        assert all(v.grad.abs().sum() > 0 for v in o.logits_s) and o.logits_lb.grad.abs().sum() > 0


def test_projection_feature_option_uses_z():
    a, s = Args(), methods.SemiState(Y_LB, K, 8, M, 2.0, 2.0)
    a.semi_feature = "projection"
    o = semi_out(0)
    methods.semi_step(o, MODEL, a, 0, s)
    rows = s.conf > 0
    kept = s.bank[rows]
    zs = torch.cat(o.z_s)
    assert all(any(torch.equal(v, r) for r in zs) for v in kept) and len(kept)


# ---------------------------------------------------------------- the model: two heads

def test_two_head_model_predicts_with_head_2_and_keeps_every_other_init():
    torch.manual_seed(0)
    peer = Encoder(K, "wrn-10-1", classifier=True)
    torch.manual_seed(0)
    semi = Encoder(K, "wrn-10-1", classifier=True, balanced=True).eval()
    for name, p in peer.state_dict().items():  # the second head is drawn last
        assert torch.equal(p, semi.state_dict()[name]), name
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        _, out = semi(x)
        h = semi.backbone(x)
    l1, l2, f = methods.heads(out, K)
    assert torch.allclose(l1, semi.classifier(h)) and torch.allclose(l2, semi.classifier_b(h))
    assert torch.equal(f, h)
    assert semi.predict(x).tolist() == l2.argmax(1).tolist()
    assert not torch.equal(semi.classifier.weight, semi.classifier_b.weight)


# ---------------------------------------------------------------- end to end

SEMI = lambda args: drop(args, "--entropy-ratio") + ["--loss", "semi", "--semi-start-epoch", "1",  # noqa: E731
                                                    "--threshold", "0.5", "--semi-decay-step", "2"]


@pytest.mark.parametrize("split", ["balanced", "labeled_idx", "long_tailed"])
def test_semi_trains_every_split_and_evaluate_agrees(tiny_npz, tmp_path, split):
    out = tmp_path / split
    args = tiny_args(tiny_npz, out)
    if split == "labeled_idx":
        (tmp_path / "lab.txt").write_text("0\n1\n4\n5\n9\n")
        args = drop(args, "--labels-per-class") + ["--labeled-idx", str(tmp_path / "lab.txt")]
    elif split == "long_tailed":
        args = lt_args(tiny_npz, out)
    res = train.main(SEMI(args))
    ckpt = final_state(out)
    assert set(ckpt["method_state"]) == set(methods.SemiState.KEYS)
    assert (ckpt["method_state"]["conf"] > 0).any()  # the bank filled
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert "test_acc_head1" in m[-1] and sum(m[-1]["oheml_hist_all"]) > 0
    r = evaluate.evaluate_checkpoint(str(out))
    assert abs(r["top1"] - res["final_acc"]) < 1e-6  # head 2 predicts, in training and here
    assert r["metrics"]["test_acc_head1"] == pytest.approx(m[-1]["test_acc_head1"])
    if split == "labeled_idx":  # query.py scores a semi run (head 2's probabilities, pooled feature)
        import query
        query.main([str(out), "--n", "2", "--strategy", "margin", "--device", "cpu",
                    "--out", str(tmp_path / "next.txt")])
        import data
        assert len(data.read_index_file(str(tmp_path / "next.txt"))) == 7  # 5 + 2


def test_semi_interrupt_and_resume_is_bitwise_exact_with_the_bank(tiny_npz, tmp_path, monkeypatch):
    """Stopped mid-run (after the parts switch on, between two bank decays) and resumed from the
    per-step checkpoint: the same final model, optimiser and SeMi state as an uninterrupted run.
    In-process (the SIGKILL version for the other methods is test_methods.py's)."""
    extra = ["--epochs", "3", "--steps-per-epoch", "4", "--save-every", "1", "--semi-decay-step", "3"]
    # threshold 0.97: some samples pass the mask (the bank fills), others not (L_cons, its centre)
    args = lambda out: SEMI(tiny_args(tiny_npz, out, *extra)) + ["--threshold", "0.97"]  # noqa: E731
    train.main(args(tmp_path / "ref"))
    k = random.Random("semi").randrange(9, 11)  # pi_hat refreshed from nonzero counts at step 7
    real = train.Run.train_step

    def stop_at_k(self):
        if self.step == k:
            raise KeyboardInterrupt
        real(self)
    monkeypatch.setattr(train.Run, "train_step", stop_at_k)
    with pytest.raises(SystemExit, match="interrupted at step"):
        train.main(args(tmp_path / "stopped"))
    monkeypatch.setattr(train.Run, "train_step", real)
    assert final_state(tmp_path / "stopped")["step"] == k
    train.main(args(tmp_path / "stopped"))
    ref, got = final_state(tmp_path / "ref"), final_state(tmp_path / "stopped")
    assert_same_state(ref, got)
    assert (ref["method_state"]["conf"] > 0).any()
    m = [json.loads(x) for x in open(tmp_path / "ref" / "metrics.jsonl")]
    assert all(0 < r["confident"] < 1 for r in m[1:])
    for key in ref["method_state"]:
        assert torch.equal(ref["method_state"][key], got["method_state"][key]), key
    lines = lambda out: [json.loads(x) for x in open(out / "metrics.jsonl")]  # noqa: E731
    assert lines(tmp_path / "ref") == [dict(m, elapsed_s=r["elapsed_s"]) for m, r in
                                       zip(lines(tmp_path / "stopped"), lines(tmp_path / "ref"))]


def test_semi_step_reads_nothing_back_to_the_host(tiny_npz, tmp_path):
    run = train.Run(config.get_args(SEMI(tiny_args(tiny_npz, tmp_path / "r")) + ["--semi-start-epoch", "0"]))
    real, calls = run.step_fn, []

    def guarded(*a, **k):
        with pytest.MonkeyPatch.context() as mp:
            forbid_host_sync(mp)
            calls.append(1)
            return real(*a, **k)
    run.step_fn = guarded
    for _ in range(4):  # a pi_hat refresh (step 2) and two decays (steps 1, 3)
        run.train_step()
    assert len(calls) == 4 and (run.method_state.conf > 0).any()


# ---------------------------------------------------------------- command line

def test_semi_flags_belong_to_semi(tiny_npz, tmp_path, capsys):
    base = drop(tiny_args(tiny_npz, tmp_path / "x"), "--entropy-ratio")
    for loss, flag in [("fixmatch", ["--oheml-scale", "0.5"]), ("entropy", ["--semi-bank-size", "4"]),
                       ("semi", ["--hard-weight", "0.75"]), ("semi", ["--lambda-u", "1"])]:
        with pytest.raises(SystemExit):
            config.get_args(base + ["--loss", loss, *flag] + (["--entropy-ratio", "0.5"] if loss == "entropy" else []))
        assert "applies to" in capsys.readouterr().err.strip().splitlines()[-1]
    a = config.get_args(base + ["--loss", "semi"])
    assert (a.threshold, a.oheml_scale, a.semi_decay_step, a.semi_ramp_epochs, a.semi_bank_size) == (0.7, 0.75, 100, 2, 128)
    assert config.get_args(base + ["--loss", "fixmatch"]).threshold == 0.95
    assert config.get_args(base + ["--loss", "fixmatch"]).oheml_scale is None
    with pytest.raises(SystemExit):
        config.get_args(base + ["--loss", "semi", "--semi-alpha", "1.5"])
    assert "--semi-alpha must be in [0, 1]" in capsys.readouterr().err


def test_lt_table_has_semi_rows_for_both_heads(tiny_npz, tmp_path):
    train.main(SEMI(lt_args(tiny_npz, tmp_path / "lt" / "semi_s0")))
    text = report.lt_table(str(tmp_path / "lt"))
    rows = [line for line in text.splitlines() if "| semi" in line]
    assert len(rows) == 2 and "semi, head 1" in rows[1] and "not run" not in rows[1].split("|")[4]
    res = json.load(open(tmp_path / "lt" / "semi_s0" / "result.json"))
    assert f"{100 * res['final']['test_acc_head1']:.2f} (1 seed)" in rows[1]
    assert f"{100 * res['final']['test_acc']:.2f} (1 seed)" in rows[0]


def test_run_lt_and_run_all_accept_semi(tmp_path):
    """run_lt.sh METHODS="fixmatch semi" HARD_WEIGHT=0.75: semi runs without --hard-weight (it
    has its own OHEML), and every command it lists parses; run_all.sh lists semi cells too."""
    here = os.path.dirname(os.path.abspath(__file__))
    for script, methods_ in (("run_lt.sh", "fixmatch semi"), ("run_all.sh", "semi")):
        env = dict(os.environ, DRY_RUN="1", OUT_DIR=str(tmp_path / "o"), METHODS=methods_,
                   HARD_WEIGHT="0.75")
        p = subprocess.run(["bash", os.path.join(here, script)], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        cmds = [shlex.split(line) for line in p.stdout.strip().splitlines() if "train.py" in line]
        semi = [c for c in cmds if c[c.index("--loss") + 1] == "semi"]
        assert semi and all("--hard-weight" not in c for c in semi)
        for c in (semi[0], semi[-1]):  # a cifar10 and a cifar100 setting
            a = config.get_args(c[2:] + ["--out", str(tmp_path / "x"), "--device", "cpu"])
            assert a.loss == "semi" and a.threshold == 0.7
            assert a.semi_decay_step == (200 if a.dataset == "cifar100" else 100)
