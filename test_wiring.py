"""Wiring of the training step, checked through what it does, not through the formulas alone.

The core test runs ONE real `Run.train_step` of every method (SeMi with all five parts on) on
a tiny model (wrn-10-1, 8 x 8 images) with every method flag at a non-default value, captures the parameter gradients the
optimizer receives, and compares them with a float64 reference written from the method's
description (docs/method.md, docs/peers.md, docs/long_tailed.md): the forward pass in train mode, the teacher from
the online model's weak view without gradient, the prototypes with gradient. For every mistake of
wiring the reference is also computed *with that mistake* (another temperature, the other loss,
the EMA teacher, eval-mode BN, a missing stop-gradient, a flag left at its default); the test
asserts that each such variant is far from the right one (so the test can tell), and when the step
is wrong it names the variant that matches it.

The other tests: thresholds compared with >= (a sample exactly at tau), the entropy threshold
strict (a sample exactly at H_th), the EMA taken after the optimizer step, BN momentum and mode,
the lr by step as the optimizer has it, --wrn-variant and every method flag reaching the model
or the step.
"""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import config
import evaluate
import losses
import methods
import train
from conftest import write_tiny_npz

K = 3  # the tiny dataset's classes


@pytest.fixture(scope="module")
def npz8(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("wiring") / "tiny8.npz", size=8)


COMMON = ["--labels-per-class", "2", "--arch", "wrn-10-1", "--batch-size", "4", "--mu", "2",
          "--epochs", "2", "--steps-per-epoch", "3", "--device", "cpu", "--log-every", "1",
          "--lr", "0.05", "--ema-decay", "0.7", "--bn-momentum", "0.3"]
# every flag a step reads, away from its default (and the temperatures all different)
METHOD_FLAGS = {
    "base": ["--threshold", "0.6", "--pl-temp", "0.05", "--temp", "0.2", "--low-weight", "0.3"],
    "entropy": ["--threshold", "0.6", "--pl-temp", "0.05", "--temp", "0.2", "--low-weight", "0.3",
                "--entropy-ratio", "0.9", "--entropy-epochs", "1"],
    "fixmatch": ["--threshold", "0.45", "--lambda-u", "0.7"],
    "ccssl": ["--threshold", "0.6", "--lambda-u", "0.7", "--lambda-c", "1.6",
              "--ccssl-temp", "0.15"],
    "simmatch": ["--threshold", "0.45", "--lambda-u", "0.7", "--lambda-in", "0.45",
                 "--bank-temp", "0.2", "--smoothing-alpha", "0.6", "--bank-momentum", "0.5",
                 "--da-len", "4"],
    "semi": ["--threshold", "0.93", "--oheml-scale", "1.0", "--lambda-cons", "4",
             "--cons-temp", "1.5", "--semi-proto-temp", "0.3", "--semi-alpha", "1.0",
             "--semi-start-epoch", "1", "--semi-ramp-epochs", "3", "--la-tau-x", "1.5",
             "--la-tau-u", "0.5", "--semi-bank-size", "4"],
}


def make_run(npz, out, loss, *extra) -> train.Run:
    common = COMMON
    if loss == "semi":  # an imbalanced labeled set (4, 2, 1 per class): logit adjustment shows
        idx = Path(npz).with_name("semi_labeled.txt")
        idx.write_text("0\n3\n6\n9\n1\n4\n2\n")
        common = COMMON[2:] + ["--labeled-idx", str(idx)]
    return train.Run(config.get_args(["--dataset", f"npz:{npz}", "--out", str(out), "--loss", loss,
                                      *common, *METHOD_FLAGS[loss], *extra]))


def capture_one_step(run: train.Run) -> dict:
    """Run one train_step; return its input batch, the state before it, the gradients and lr the
    optimizer saw, and the parameters right after the optimizer step."""
    rec = {"model0": copy.deepcopy(run.model), "ema0": copy.deepcopy(run.ema),
           "state0": copy.deepcopy(run.method_state), "step": run.step}
    real_forward, real_step = run.forward, run.opt.step

    def forward(x):
        rec["x"] = x.detach().clone()
        return real_forward(x)

    def opt_step(*a, **k):
        rec["grads"] = {n: None if p.grad is None else p.grad.detach().clone()
                        for n, p in run.model.named_parameters()}
        rec["lr"] = [g["lr"] for g in run.opt.param_groups]
        out = real_step(*a, **k)
        rec["after_opt"] = [p.detach().clone() for p in run.model.parameters()]
        return out

    run.forward, run.opt.step = forward, opt_step
    run.train_step()
    run.forward, run.opt.step = real_forward, real_step
    return rec


# ---------------------------------------------------------------- float64 references of the method descriptions

def supcon64(f, y, w, t, pair=None):
    """Eq. (6) (pair=None: anchor weights) or Eq. (8) (pair 'geometric' sqrt(w_i w_p), 'product'
    w_i w_p) over rows f, one anchor at a time."""
    z = f / f.norm(dim=1, keepdim=True)
    s = z @ z.T / t
    w = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in w])
    n, num, den = len(z), 0.0, 0.0
    for i in range(n):
        pos = [p for p in range(n) if p != i and y[p] == y[i]]
        if not pos:
            continue
        others = [a for a in range(n) if a != i]
        neg_l = torch.logsumexp(s[i, others], 0) - s[i, pos]  # -l_ip for p in P(i)
        if pair is None:
            num = num + w[i] * neg_l.mean()
            den = den + w[i]
        else:
            pw = (w[i] * w[pos]).sqrt() if pair == "geometric" else w[i] * w[pos]
            num = num + (pw * neg_l).sum() / len(pos)
            den = den + pw.sum() / len(pos)
    return num / den


def pseudo_labels64(q, tau, beta, lam, weighting):
    """Eqs. (5), (7), (9)-(14) per sample: (labels, weights) as Python lists."""
    u, k = q.shape
    labels, weights = [], []
    for b, row in enumerate(q.tolist()):
        conf = max(row)
        pred = row.index(conf)
        h = -sum(v * math.log(v) for v in row if v > 0)
        h_th = None if beta is None else beta * math.log(k)
        kk = None if beta is None else math.log(1 / lam) / h_th
        if conf >= tau:
            labels.append(pred), weights.append(1.0)
        elif beta is not None and h < h_th:
            labels.append(pred)
            weights.append({"exp": math.exp(-kk * h), "linear": 1 - (1 - lam) * h / h_th,
                            "unique-exp": 1.0}[weighting])
        else:
            labels.append(k + b)
            weights.append(math.exp(-kk * h) if weighting == "unique-exp" and beta else lam)
    return labels, weights


def ce64(logits, target):
    """Soft cross-entropy per row: -sum_k t_k log softmax(logits)_k."""
    return -(target * torch.log_softmax(logits, 1)).sum(1)


def ccssl64(z1, z2, pl, conf, t):
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    u = len(pl)
    y, c = pl.tolist() * 2, torch.cat([conf, conf])
    s = z @ z.T / t
    total = 0.0
    for i in range(2 * u):
        lse = torch.logsumexp(s[i, [a for a in range(2 * u) if a != i]], 0)
        pos = [j for j in range(2 * u) if j != i and y[j] == y[i]]
        w = torch.stack([torch.ones((), dtype=torch.float64) if j == (i + u) % (2 * u)
                         else c[i] * c[j] for j in pos])
        total = total + (w * (lse - s[i, pos])).sum() / w.sum()
    return total / (2 * u)


def semi64(lv, tlw, a, rec, y_lb, k, mistake=None):
    """SeMi's loss of one step (docs/long_tailed.md) in float64, from the views' outputs
    [head 1 | head 2 | pooled feature] (lv: labeled, weak, strong 1, strong 2) and the teacher's
    weak-view outputs tlw. Returns (loss, (p' the blended teacher, p the raw one))."""
    hd = lambda t: (t[:, :k], t[:, k:2 * k], t[:, 2 * k:])  # noqa: E731
    n = [sum(1 for y in rec["y_labeled"].tolist() if y == c) for c in range(k)]
    prior = torch.tensor([v / sum(n) for v in n], dtype=torch.float64)
    adj = lambda tau: torch.log(prior ** tau + 1e-12)  # noqa: E731
    l1_lb, l2_lb, _ = hd(lv[0])
    y = torch.tensor(y_lb)
    loss = F.cross_entropy(l1_lb, y) + F.cross_entropy(l2_lb + adj(a.la_tau_x), y)
    l1_w, l2_w, f_w = hd(tlw)
    (s1_1, s1_2, f_s1), (s2_1, s2_2, f_s2) = hd(lv[2]), hd(lv[3])
    epoch = rec["step"] // a.steps_per_epoch
    on = epoch >= a.semi_start_epoch
    st = rec["state0"]
    p_raw = torch.softmax(l1_w, 1)
    p = p_raw
    if on:
        centres = st.bank.double().mean(1)  # the bank before this step's push
        u = len(p_raw)
        f_bank = f_s2 if mistake == "semi:view2-bank" else f_s1  # the first strong view's feature
        dist = torch.stack([torch.stack([(f_bank[b].detach() - centres[c]).pow(2).sum().sqrt()
                                         for c in range(k)]) for b in range(u)])
        q_proto = torch.softmax(-dist / a.semi_proto_temp, 1)
        ramp = min(epoch / a.semi_ramp_epochs, 1.0)
        a_c = a.semi_alpha * ramp * st.share.double()
        p = (1 - a_c) * p_raw + a_c * q_proto  # not renormalised
        if mistake == "semi:renormalised":
            p = p / p.sum(1, keepdim=True)
    conf, pl = p.max(1)
    mask = ((conf >= a.threshold) | (p_raw.max(1).values >= a.threshold)).double()
    h = -(p * p.clamp(min=1e-300).log()).sum(1)
    w = a.oheml_scale * h / math.log(k) + 1 - a.oheml_scale if on else torch.ones_like(conf)
    p_b = torch.softmax(l1_w - adj(a.la_tau_u), 1)
    pl_b = p_b.max(1).indices
    mask_b = ((p_b.max(1).values >= a.threshold) |
              (torch.softmax(l2_w, 1).max(1).values >= a.threshold)).double()
    u2 = 2 * len(pl)
    for s_1, s_2 in ((s1_1, s1_2), (s2_1, s2_2)):
        loss = loss + (F.cross_entropy(s_1, pl.detach(), reduction="none") * mask * w).sum() / u2
        loss = loss + (F.cross_entropy(s_2, pl_b.detach(), reduction="none") * mask_b).sum() / u2
    if on:
        center = st.center.double()  # the centre before this step's update
        if mistake == "semi:center-after":
            q0 = torch.softmax((torch.cat([f_w, f_w]).detach() - center) / (a.cons_temp / 5), 1)
            center = 0.9 * center + 0.1 * q0.mean(0)
        q = torch.softmax((f_w - center) / (a.cons_temp / 5), 1)
        for f_s in (f_s1, f_s2):
            cons = -(q * torch.log_softmax(f_s / a.cons_temp, 1)).sum(1)
            loss = loss + a.lambda_cons * (cons * (1 - mask)).sum() / u2
    return loss, (p, p_raw)


def reference_loss(m64, ema64, x, a, rec, n_lb, n_ulb, n_strong, y_lb, mistake=None):
    """The loss of one step written from docs/method.md and docs/peers.md in float64.
    `mistake` makes one wiring mistake on purpose (see MISTAKES)."""
    a = copy.copy(a)
    if mistake and mistake.startswith("flag:"):  # a flag that never reached the step
        name = mistake[5:]
        setattr(a, name, methods.FLAGS[name][0] if methods.FLAGS.get(name, (None,))[0] is not None
                else {"threshold": 0.7 if a.loss == "semi" else 0.95, "entropy_ratio": 0.4,
                      "semi_ramp_epochs": a.epochs}[name])
    if mistake == "swap:temp":  # the contrastive loss with T_pl, the pseudo-labels with T
        a.temp, a.pl_temp = a.pl_temp, a.temp
    if mistake == "swap:pl_temp":
        a.pl_temp = a.temp
    m64.train(mistake != "bn:eval")
    z, logits = m64(x)
    views = lambda t: [t[:n_lb]] + list(t[n_lb:].split(n_ulb))  # noqa: E731
    zv = views(z)
    lv = views(logits) if logits is not None else None
    teacher = m64
    if mistake == "teacher:ema":
        ema64.train(True)
        teacher = ema64
    tz, tl = teacher(x) if teacher is not m64 else (z, logits)
    tz_w = tz[n_lb:n_lb + n_ulb]
    tl_w = tl[n_lb:n_lb + n_ulb] if tl is not None else None
    if mistake != "no-stop-gradient":
        tz_w = tz_w.detach()
        tl_w = tl_w.detach() if tl_w is not None else None
    y_lb = y_lb.tolist()
    if a.loss in ("base", "entropy"):
        protos = teacher.prototypes
        protos_t = protos if mistake == "no-stop-gradient" else protos.detach()
        cos = F.normalize(tz_w, dim=1) @ F.normalize(protos_t, dim=1).T
        q = torch.softmax(cos / a.pl_temp, 1)
        entropy_on = a.loss == "entropy" and rec["step"] < a.entropy_epochs * a.steps_per_epoch
        beta = a.entropy_ratio if entropy_on else None
        pl, pw = pseudo_labels64(q.detach(), a.threshold, beta, a.low_weight,
                                 a.entropy_weighting)
        if mistake == "no-stop-gradient" and beta is not None:  # weights as functions of q
            h = -(q * q.clamp(min=1e-300).log()).sum(1)
            kk = math.log(1 / a.low_weight) / (beta * math.log(q.shape[1]))
            pw = [torch.exp(-kk * h[b]) if pl[b] < q.shape[1] and pw[b] != 1.0 else pw[b]
                  for b in range(len(pl))]
        feats = torch.cat([m64.prototypes, zv[0], zv[2], zv[3]])
        labels = list(range(q.shape[1])) + y_lb + pl + pl
        weights = [1.0] * (q.shape[1] + n_lb) + pw + pw
        use_pair = (a.loss == "entropy") != (mistake == "loss:other")
        return supcon64(feats, labels, weights, a.temp, a.pair_weight or "geometric"
                        if use_pair else None), q
    if a.loss == "semi":
        return semi64(lv, tl_w, a, rec, y_lb, m64.classifier.out_features, mistake)
    p = torch.softmax(tl_w, 1)
    lx = F.cross_entropy(lv[0], torch.tensor(y_lb))
    if a.loss in ("fixmatch", "ccssl"):
        conf, pl = p.max(1)
        mask = (conf >= a.threshold).double().detach()
        lu = (mask * ce64(lv[2], F.one_hot(pl, p.shape[1]).double())).sum() / n_ulb
        loss = lx + a.lambda_u * lu
        if a.loss == "ccssl":
            loss = loss + a.lambda_c * ccssl64(zv[2], zv[3], pl, conf, a.ccssl_temp)
        return loss, p
    # SimMatch, past its first epoch: distribution alignment, label propagation through the bank
    st = rec["state0"]
    queue, filled = st.queue.double().clone(), int(st.filled)
    queue[filled % len(queue)] = p.mean(0).detach()
    mean = queue[:min(filled + 1, len(queue))].mean(0)
    p_w = p / p.shape[1] / mean
    p_w = p_w / p_w.sum(1, keepdim=True)
    bank, bank_y = st.bank.double(), st.labels.tolist()
    qb = torch.softmax(tz_w @ bank.T / a.bank_temp, 1)
    onehot = torch.tensor([[float(bank_y[j] == k) for k in range(p.shape[1])]
                           for j in range(len(bank_y))], dtype=torch.float64)
    unfolded = qb * (p_w @ onehot.T)
    q_hat = unfolded / unfolded.sum(1, keepdim=True)
    p_hat = a.smoothing_alpha * p_w + (1 - a.smoothing_alpha) * (qb @ onehot)
    mask = (p_hat.max(1).values >= a.threshold).double().detach()
    lu = (mask * ce64(lv[2], p_hat)).mean()
    l_in = ce64(zv[2] @ bank.T / a.bank_temp, q_hat).mean()
    return lx + a.lambda_u * lu + a.lambda_in * l_in, p_hat


# the mistakes each method's step could make, as the reference makes them
MISTAKES = {
    # base: Eq. (8) with [G]'s weights equals Eq. (6) (equal weights within every label), so which
    # function it calls is checked by test_base_calls_eq6_and_entropy_eq8_with_t instead
    "base": ["swap:temp", "swap:pl_temp", "flag:temp", "flag:low_weight", "flag:threshold",
             "bn:eval", "teacher:ema"],
    "entropy": ["swap:temp", "swap:pl_temp", "flag:temp", "flag:pl_temp", "flag:low_weight",
                "flag:entropy_ratio", "loss:other", "bn:eval", "teacher:ema",
                "no-stop-gradient"],
    "fixmatch": ["flag:lambda_u", "flag:threshold", "bn:eval", "teacher:ema"],
    "ccssl": ["flag:lambda_u", "flag:lambda_c", "flag:ccssl_temp", "bn:eval", "teacher:ema",
              "no-stop-gradient"],
    "simmatch": ["flag:lambda_u", "flag:lambda_in", "flag:bank_temp", "flag:smoothing_alpha",
                 "flag:threshold", "bn:eval", "teacher:ema", "no-stop-gradient"],
    "semi": ["flag:threshold", "flag:oheml_scale", "flag:lambda_cons", "flag:cons_temp",
             "flag:semi_proto_temp", "flag:semi_alpha", "flag:semi_start_epoch", "flag:la_tau_x",
             "flag:la_tau_u", "flag:semi_ramp_epochs", "bn:eval", "teacher:ema",
             "no-stop-gradient", "semi:view2-bank", "semi:renormalised", "semi:center-after"],
}
TOL = 2e-4  # relative error of the float32 step against float64


def reference_grads(run, rec, mistake=None):
    # float64, contiguous (channels_last float64 convolutions are a slow path on the CPU)
    m64, ema64 = (copy.deepcopy(m).double().to(memory_format=torch.contiguous_format)
                  for m in (rec["model0"], rec["ema0"]))
    ema64.requires_grad_(True)
    a = run.args
    n_lb, n_ulb = a.batch_size, a.mu * a.batch_size
    y_lb = run.y_train[run.lb[rec["y_pos"]]]
    loss, teacher_p = reference_loss(m64, ema64, rec["x"].double().contiguous(), a, rec, n_lb, n_ulb,
                                     run.n_strong, y_lb, mistake)
    names = [n for n, p in m64.named_parameters() if p.requires_grad]
    params = [p for p in m64.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: torch.zeros_like(p) if gi is None else gi
            for n, p, gi in zip(names, params, g)}, teacher_p


def rel_err(got: dict, ref: dict) -> float:
    num = sum(float(((got[n].double() if got[n] is not None else 0) - ref[n]).pow(2).sum())
              for n in ref)
    return math.sqrt(num) / math.sqrt(sum(float(r.pow(2).sum()) for r in ref.values()))


@pytest.mark.parametrize("loss", list(methods.STEPS))
def test_one_step_parameter_gradients_match_the_float64_reference(npz8, tmp_path, loss):
    torch.manual_seed(0)
    run = make_run(npz8, tmp_path / loss, loss)
    with torch.no_grad():  # an EMA unlike the online model, so that a teacher from it shows
        for p in run.ema.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if loss == "simmatch":
        run.step = run.args.steps_per_epoch  # past SimMatch's warm-up epoch: bank terms on
    if loss == "semi":  # epoch 1 >= --semi-start-epoch: every part on, with a bank to read
        run.step = run.args.steps_per_epoch
        st, g = run.method_state, torch.Generator().manual_seed(1)
        k_, m_, d_ = st.bank.shape  # class centres apart by about the temperatures' scale
        st.bank = torch.rand(k_, m_, d_, generator=g) + 0.05 * torch.randn(k_, 1, d_, generator=g)
        st.conf = torch.rand(st.conf.shape, generator=g).sort(1, descending=True).values
        st.share = torch.softmax(2 * torch.randn(K, generator=g), 0)
        st.center = 0.1 * torch.randn(st.center.shape, generator=g)
        with torch.no_grad():  # a sharper head 1: OHEML weights far from 1, both sides of t
            run.model.classifier.weight.mul_(4)
    pos_seen = []
    real_next = run.sampler_lb.next
    run.sampler_lb.next = lambda: pos_seen.append(real_next()) or pos_seen[-1]
    rec = capture_one_step(run)
    rec["y_pos"] = pos_seen[0]
    rec["y_labeled"] = run.y_train[run.lb]
    ref, p = reference_grads(run, rec)
    # the batch exercises both sides of every rule the step applies
    if loss == "semi":  # its mask: max p' >= t or max p >= t
        conf = torch.maximum(p[0].max(1).values, p[1].max(1).values)
    else:
        conf = p.max(1).values
    assert 0 < int((conf >= run.args.threshold).sum()) < len(conf), "test data: mask all 0 or 1"
    if loss == "entropy":
        h = -(p * p.log()).sum(1)
        sel = (conf < run.args.threshold) & (h < run.args.entropy_ratio * math.log(K))
        assert 0 < int(sel.sum()) < int((conf < run.args.threshold).sum()), "test data: selection"
    err = rel_err(rec["grads"], ref)
    assert all(rec["grads"][n] is not None for n in ref if ref[n].abs().sum() > 0), \
        f"{loss}: parameters the method trains got no gradient"
    if "prototypes" in ref:
        assert rec["grads"]["prototypes"].abs().sum() > 0, "the prototypes received no gradient"
    variants = {m: rel_err(rec["grads"], reference_grads(run, rec, m)[0]) for m in MISTAKES[loss]}
    if err > TOL:
        best = min(variants, key=variants.get)
        hint = f"; it matches the reference with the mistake '{best}'" if variants[best] < TOL else ""
        pytest.fail(f"{loss}: one step's parameter gradients differ from the float64 reference of "
                    f"the method description (relative error {err:.2e}){hint}")
    # the test can tell each mistake from the right step: every variant fails the check above
    # with a margin (the right step is at about 1e-6, the variants at 2e-3 and more)
    for m, e in variants.items():
        assert e > 5 * TOL, f"{loss}: this test cannot detect the mistake '{m}' (error {e:.1e})"


class _ProtoModel(torch.nn.Module):
    def __init__(self, protos):
        super().__init__()
        self.prototypes = torch.nn.Parameter(protos)


def _out(u=8, b=4, d=16, n_strong=2, seed=0, sharp=4.0, k=K):
    g = torch.Generator().manual_seed(seed)
    z = lambda n: F.normalize(torch.randn(n, d, generator=g), dim=1)  # noqa: E731
    lg = lambda n: torch.randn(n, k, generator=g) * sharp  # noqa: E731
    return methods.Out(z(b), z(u), [z(u) for _ in range(n_strong)], lg(b), lg(u),
                       [lg(u) for _ in range(n_strong)], torch.randint(0, k, (b,), generator=g),
                       torch.arange(b), torch.randint(0, k, (u,), generator=g))


class _Args:
    loss, threshold, pl_temp, temp, low_weight = "entropy", 0.95, 0.05, 0.2, 0.3
    entropy_ratio, entropy_weighting, pair_weight = 0.5, "exp", "geometric"
    lambda_u, lambda_c, ccssl_temp, lambda_in = 1.0, 1.0, 0.07, 1.0
    bank_momentum, bank_temp, smoothing_alpha, da_len, hard_weight = 0.7, 0.1, 0.9, 3, 0.0
    entropy_epochs, steps_per_epoch = 1, 1


@pytest.mark.parametrize("loss, step, expected", [("base", 0, "anchor_weighted_supcon"),
                                                  ("entropy", 0, "pair_weighted_supcon"),
                                                  ("entropy", 5, "pair_weighted_supcon")])
def test_base_calls_eq6_and_entropy_eq8_with_t(monkeypatch, loss, step, expected):
    """--loss base trains with Eq. (6), --loss entropy with Eq. (8) (also after the entropy
    epochs), both at the contrastive temperature T, not T_pl."""
    seen = []
    for name in ("anchor_weighted_supcon", "pair_weighted_supcon"):
        monkeypatch.setattr(losses, name, lambda f, y, w, t, validate=True, name=name, **kw:
                            seen.append((name, t)) or f.sum() * 0)
    a = _Args()
    a.loss = loss
    methods.contrastive_step(_out(), _ProtoModel(torch.randn(K, 16)), a, step)
    assert seen == [(expected, a.temp)], f"--loss {loss} called {seen}, not {expected} at T"


# ---------------------------------------------------------------- thresholds: >= tau, < H_th

def test_assign_pseudo_labels_confidence_exactly_at_tau_is_confident():
    p = torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.25, 0.25]])
    for beta in (None, 0.9):  # [G] and [N&O]: at beta 0.9 row 0 would also be entropy-selected
        labels, w = losses.assign_pseudo_labels(p, threshold=0.75, entropy_ratio=beta)
        assert labels[0] == 0 and w[0] == 1.0, \
            f"beta {beta}: max q == tau must be confident (weight 1): compare with >=, not >"


def _row_with_entropy_exactly(h_target):
    """(a, 1 - a, 0) whose float32 entropy (as losses.entropy computes it) is h_target."""
    lo, hi = 0.5, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        ha = -(a * math.log(a) + (1 - a) * math.log(1 - a))
        lo, hi = (a, hi) if ha > h_target else (lo, a)
    return torch.tensor([[a, 1 - a, 0.0]])


@pytest.mark.parametrize("weighting", list(losses.WEIGHTINGS))
def test_entropy_exactly_at_h_th_is_not_selected(weighting):
    """Eq. (11) selects H < H_th (strictly): a sample at H_th keeps its unique label (and, for
    every weighting, the weight lambda); one just below is selected."""
    k, lam = 3, 0.3
    p = _row_with_entropy_exactly(0.6)
    h = losses.entropy(p)[0]
    beta = float(h) / math.log(k)
    assert torch.tensor(beta * math.log(k), dtype=torch.float32) == h  # exactly at H_th
    labels, w = losses.assign_pseudo_labels(p, 0.99, beta, lam, weighting)
    assert labels[0] == k, f"{weighting}: H == H_th was entropy-selected: compare H < H_th, not <="
    assert w[0].item() == pytest.approx(lam, rel=1e-6)
    labels, _ = losses.assign_pseudo_labels(p, 0.99, beta * (1 + 1e-5), lam, weighting)
    assert labels[0] == 0


def test_contrastive_step_counts_max_q_exactly_at_tau_as_confident(monkeypatch):
    q = torch.tensor([[0.75, 0.25, 0.0]] * 2 + [[0.5, 0.3, 0.2]] * 6)
    monkeypatch.setattr(losses, "prototype_probs", lambda z, c, t: q)
    a = _Args()
    a.threshold = 0.75
    for loss in ("base", "entropy"):
        a.loss = loss
        _, diag, _ = methods.contrastive_step(_out(), _ProtoModel(torch.randn(K, 16)), a)
        d = dict(zip(methods.DIAG, diag.tolist()))
        assert d["confident"] == 2, f"{loss}: max q == tau not counted confident (>= vs >)"


def _peer_step_at_tau(loss, monkeypatch):
    """Run a peer step with tau set exactly to sample 0's teacher confidence; return the
    confident count and the gradient of sample 0's strong-view logits."""
    o = _out(n_strong=methods.STRONG_VIEWS[loss], sharp=2.0)
    a = _Args()
    a.loss = loss
    mk = lambda: methods.SimMatchState(torch.arange(4) % K, K, 16, 3,  # noqa: E731
                                       torch.Generator().manual_seed(0))
    step = 1  # SimMatch past its first epoch (steps_per_epoch 1)
    if loss == "simmatch":  # p_hat is computed inside the step: read it from a dry run
        seen = []
        real = losses.soft_cross_entropy
        monkeypatch.setattr(losses, "soft_cross_entropy",
                            lambda lg, t: seen.append(t.clone()) or real(lg, t))
        methods.simmatch_step(o, None, a, step, mk())
        monkeypatch.setattr(losses, "soft_cross_entropy", real)
        conf = seen[0].max(1).values
    else:
        conf = torch.softmax(o.logits_w.float(), 1).max(1).values
    a.threshold = conf[0].item()
    expected = int((conf >= conf[0]).sum())
    assert expected < len(conf)
    o.logits_s[0].requires_grad_(True)
    loss_v, diag, _ = methods.STEPS[loss](o, None, a, step, mk() if loss == "simmatch" else None)
    loss_v.backward()
    return dict(zip(methods.DIAG, diag.tolist()))["confident"], expected, o.logits_s[0].grad[0]


@pytest.mark.parametrize("loss", ["fixmatch", "ccssl", "simmatch"])
def test_peer_mask_is_on_exactly_at_tau(monkeypatch, loss):
    got, expected, g0 = _peer_step_at_tau(loss, monkeypatch)
    assert got == expected and g0.abs().sum() > 0, \
        f"{loss}: a teacher confidence exactly at tau is masked out: compare with >=, not >"


def _semi_teacher_inputs(on):
    g = torch.Generator().manual_seed(3)
    y_lab = torch.tensor([0, 0, 0, 0, 1, 1, 2])  # imbalanced: head 2's adjustment is not constant
    st = methods.SemiState(y_lab, K, 5, 4, 2.0, 1.0)
    st.bank = torch.rand(K, 4, 5, generator=g) + torch.randn(K, 1, 5, generator=g)
    st.share = torch.tensor([0.9, 0.6, 0.3])  # a large blend, so that p' can lead p
    a = _Args()
    a.semi_proto_temp, a.semi_ramp_epochs, a.semi_alpha, a.oheml_scale = 0.05, 1, 0.9, 0.75
    l1_w, l2_w = (torch.randn(6, K, generator=g) * 2 for _ in range(2))
    f_s1 = torch.randn(6, 5, generator=g)
    return l1_w, l2_w, f_s1, a, st, (lambda: methods.semi_targets(l1_w, l2_w, f_s1, a, st, 1, on))


@pytest.mark.parametrize("rule", ["p_blend", "p_raw", "p_adjusted", "p_head2"])
def test_semi_masks_are_on_exactly_at_t(rule):
    """Each of SeMi's four threshold comparisons is >= t: with t set exactly to sample 0's value
    of that quantity (and sample 0's other quantity of the same mask below t), its mask is on."""
    l1_w, l2_w, f_s1, a, st, targets = _semi_teacher_inputs(on=True)
    p_raw = torch.softmax(l1_w, 1)
    q = losses.bank_class_probs(f_s1, st.centres(), a.semi_proto_temp)
    p_blend = losses.semantic_blend(p_raw, q, st.share, a.semi_alpha, 1.0)
    values = {"p_blend": p_blend.max(1).values, "p_raw": p_raw.max(1).values,
              "p_adjusted": torch.softmax(l1_w - st.adj_u, 1).max(1).values,
              "p_head2": torch.softmax(l2_w, 1).max(1).values}
    other = {"p_blend": "p_raw", "p_raw": "p_blend", "p_adjusted": "p_head2",
             "p_head2": "p_adjusted"}[rule]
    # a sample whose two quantities differ, so that only the one under test can pass
    i = int((values[rule] - values[other]).argmax())
    assert values[rule][i] > values[other][i], "test data: no sample where this quantity leads"
    a.threshold = values[rule][i].item()
    pl, conf, mask, w, pl_b, mask_b = targets()
    m = mask if rule in ("p_blend", "p_raw") else mask_b
    assert bool(m[i]), f"semi: a value of {rule} exactly at t is masked out: compare with >=, not >"
    # and one float32 step above t it is off: the test can tell
    a.threshold = torch.nextafter(values[rule][i], torch.tensor(2.0)).item()
    m = targets()[2] if rule in ("p_blend", "p_raw") else targets()[5]
    assert not bool(m[i])


# ---------------------------------------------------------------- the update: lr, optimizer, EMA

def test_ema_is_updated_after_the_optimizer_step(npz8, tmp_path):
    run = make_run(npz8, tmp_path / "r", "entropy")
    with torch.no_grad():  # an EMA unlike the online model: an update with the pre-step weights shows
        for p in run.ema.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rec = capture_one_step(run)
    d = run.args.ema_decay
    after = [d * e + (1 - d) * p for e, p in zip(rec["ema0"].parameters(), rec["after_opt"])]
    before = [d * e + (1 - d) * p for e, p in zip(rec["ema0"].parameters(),
                                                    rec["model0"].parameters())]
    ema = list(run.ema.parameters())
    assert not all(torch.allclose(e, b, atol=1e-6) for e, b in zip(ema, before)), \
        "the EMA was updated before the optimizer step (it holds the pre-step weights)"
    for e, x in zip(ema, after):
        torch.testing.assert_close(e, x, msg="the EMA is not decay * ema + (1 - decay) * new weights "
                                             "(--ema-decay not used, or updated at the wrong time)")
    for e, m in zip(run.ema.buffers(), run.model.buffers()):
        assert torch.equal(e, m), "the EMA's BN statistics are not the online model's after the step"


@pytest.mark.parametrize("loss", ["entropy", "fixmatch"])
def test_lr_follows_lr_at_per_step_as_the_optimizer_has_it(npz8, tmp_path, loss):
    run = make_run(npz8, tmp_path / "r", loss)
    seen, logged = [], []
    for s in range(run.total):
        rec = capture_one_step(run)
        seen.append(rec["lr"])
        logged.append(run.lr())
    want = [train.lr_at(s, run.total, run.args.lr) for s in range(run.total)]
    assert [l[0] for l in seen] == want and all(l[0] == l[1] for l in seen), \
        f"the optimizer's lr is not lr_at(step) at every step (by epoch?): {seen}"
    assert logged == want, "Run.lr() does not report the lr the optimizer used"


# ---------------------------------------------------------------- BatchNorm: momentum and mode

def _bn_inputs(model):
    seen, hooks = {}, []

    def hook(name):
        def record(mod, inp):
            seen.setdefault(name, inp[0].detach().double())  # returns None: input unchanged
        return record
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    return seen, hooks


def test_training_forward_uses_train_mode_bn_with_bn_momentum_and_evaluation_eval_mode(npz8,
                                                                                        tmp_path):
    run = make_run(npz8, tmp_path / "r", "entropy")
    m = run.args.bn_momentum
    bns = {n: b for n, b in run.model.named_modules() if isinstance(b, torch.nn.BatchNorm2d)}
    assert all(b.momentum == m for b in bns.values()), "--bn-momentum did not reach every BatchNorm"
    run.evaluate()  # evaluation must leave the online model in train mode
    before = {n: (b.running_mean.clone(), b.running_var.clone()) for n, b in bns.items()}
    seen, hooks = _bn_inputs(run.model)
    run.train_step()
    for h in hooks:
        h.remove()
    assert seen, "no BatchNorm saw the training batch"
    for n, x in seen.items():
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
        rm0, rv0 = before[n]
        torch.testing.assert_close(bns[n].running_mean.double(), (1 - m) * rm0 + m * mean,
                                   rtol=1e-4, atol=1e-6, msg=f"{n}: the training forward did not "
                                   "update the BN statistics with --bn-momentum (eval mode?)")
        torch.testing.assert_close(bns[n].running_var.double(), (1 - m) * rv0 + m * var,
                                   rtol=1e-4, atol=1e-6, msg=f"{n}: running_var")
    # evaluation: eval mode (running statistics, nothing updated), batch-independent scores
    ema_stats = [b.clone() for b in run.ema.buffers()]
    s7 = evaluate.scores_all(run.ema, run.x_test, run.norm, 7)
    s_all = evaluate.scores_all(run.ema, run.x_test, run.norm, 1024)
    assert all(torch.equal(a, b) for a, b in zip(ema_stats, run.ema.buffers())
               if a.is_floating_point()), "evaluation updated the EMA's BN statistics (train mode)"
    torch.testing.assert_close(s7, s_all, rtol=1e-5, atol=1e-6,
                               msg="evaluation scores depend on the batch (BN in train mode)")
    with torch.no_grad():
        train_mode = copy.deepcopy(run.ema).train().class_scores(run.norm(run.x_test))
    assert not torch.allclose(train_mode, s_all, atol=1e-3)  # the check can tell the modes apart


def test_evaluation_scores_the_ema_model_in_eval_mode(npz8, tmp_path, monkeypatch):
    run = make_run(npz8, tmp_path / "r", "entropy")
    with torch.no_grad():  # an EMA unlike the online model
        for p in run.ema.parameters():
            p.add_(0.3 * torch.randn_like(p))
    seen = []
    monkeypatch.setattr(train, "eval_metrics", lambda scores, *a, **k: seen.append(scores) or {})
    run.evaluate()
    ema = copy.deepcopy(run.ema).eval()
    online = copy.deepcopy(run.model).eval()
    with torch.no_grad():
        want = ema.class_scores(run.norm(run.x_test)) / run.args.pl_temp
        other = online.class_scores(run.norm(run.x_test)) / run.args.pl_temp
    assert not torch.allclose(want, other, atol=1e-3)
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5,
                               msg="evaluation does not score the EMA model in eval mode, / T_pl")


@pytest.mark.parametrize("variant", ["usb", "tf"])
def test_wrn_variant_and_bn_momentum_reach_the_model(npz8, tmp_path, variant):
    run = make_run(npz8, tmp_path / variant, "fixmatch", "--wrn-variant", variant,
                   "--bn-momentum", "0.07")
    bb = run.model.backbone
    assert (bb.stem.bias is not None) == (variant == "usb"), f"--wrn-variant {variant}: stem bias"
    raw = [b.raw_input for b in bb.blocks]
    assert raw == ([False, True, True] if variant == "usb" else [False] * 3), \
        f"--wrn-variant {variant} did not reach the blocks"
    assert bb.bn.eps == (1e-3 if variant == "usb" else 1e-5)
    assert all(b.momentum == 0.07 for b in run.model.modules()
               if isinstance(b, torch.nn.BatchNorm2d)), "--bn-momentum did not reach every BN"


def _nondefault(name, default):
    if default is None:  # resolved from other flags (e.g. SeMi's decay step and ramp)
        return 7
    if isinstance(default, str):
        return "product" if name == "pair_weight" else default
    return default + 3 if isinstance(default, int) else default / 2 + 0.01


@pytest.mark.parametrize("name", list(methods.FLAGS))
def test_every_method_flag_reaches_the_args_the_step_reads(npz8, tmp_path, name):
    default, applies = methods.FLAGS[name]
    value = _nondefault(name, default)
    loss = applies[-1]
    argv = ["--dataset", f"npz:{npz8}", "--out", str(tmp_path / "x"), "--loss", loss, *COMMON,
            f"--{name.replace('_', '-')}", str(value)]
    if loss in ("base", "entropy"):
        argv += ["--entropy-ratio", "0.5"]
    if name == "hard_weight":  # it starts after epoch 5: a shorter run refuses it
        argv += ["--epochs", "6"]
    a = config.get_args(argv)
    assert getattr(a, name) == value, f"--{name.replace('_', '-')} {value} became {getattr(a, name)}"
