"""losses.py against naive float64 loop references written from docs/method.md."""
import math

import pytest
import torch

from losses import (anchor_weighted_supcon, assign_pseudo_labels, contrastive_batch, entropy,
                    pair_weighted_supcon, prototype_probs)


# ---------------------------------------------------------------- naive references (loops, float64)

def ref_probs(z, c, t):
    z, c = z.double().tolist(), c.double().tolist()
    out = []
    for zb in z:
        nz = math.sqrt(sum(v * v for v in zb))
        logits = []
        for ck in c:
            nc = math.sqrt(sum(v * v for v in ck))
            logits.append(sum(a * b for a, b in zip(zb, ck)) / (nz * nc) / t)
        m = max(logits)
        e = [math.exp(l - m) for l in logits]
        out.append([v / sum(e) for v in e])
    return torch.tensor(out, dtype=torch.float64)


def ref_entropy(p):
    return torch.tensor([-sum(q * math.log(q) for q in row if q > 0) for row in p.double().tolist()],
                        dtype=torch.float64)


def ref_assign(p, tau, beta, lam, weighting):
    u, k = p.shape
    labels, weights = [], []
    for j, row in enumerate(p.double().tolist()):
        conf = max(row)
        pred = row.index(conf)
        h = -sum(q * math.log(q) for q in row if q > 0)
        if conf >= tau:
            labels.append(pred); weights.append(1.0)
        elif beta is not None and h < beta * math.log(k):
            h_th = beta * math.log(k)
            labels.append(pred)
            if weighting == "exp":
                weights.append(math.exp(-math.log(1 / lam) / h_th * h))
            elif weighting == "unique-exp":  # the other reading: selected like confident
                weights.append(1.0)
            else:
                weights.append(1 - (1 - lam) * h / h_th)
        elif beta is not None and weighting == "unique-exp":  # the rest decay past lambda
            labels.append(k + j); weights.append(math.exp(-math.log(1 / lam) / (beta * math.log(k)) * h))
        else:
            labels.append(k + j); weights.append(lam)
    return labels, weights


def _ref_log_prob(f, t):
    f = f.double().tolist()
    z = []
    for row in f:
        nr = math.sqrt(sum(v * v for v in row))
        z.append([v / nr for v in row])
    n = len(z)
    s = [[sum(a * b for a, b in zip(z[i], z[j])) / t for j in range(n)] for i in range(n)]
    lp = [[0.0] * n for _ in range(n)]
    for i in range(n):
        den = math.log(sum(math.exp(s[i][a]) for a in range(n) if a != i))
        for p in range(n):
            lp[i][p] = s[i][p] - den
    return lp


def ref_anchor_weighted(f, y, w, t):
    lp, y, w = _ref_log_prob(f, t), y.tolist(), w.double().tolist()
    num = den = 0.0
    for i in range(len(y)):
        pos = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        if not pos:
            continue
        num += w[i] * -sum(lp[i][p] for p in pos) / len(pos)
        den += w[i]
    return num / den if den > 0 else 0.0


def ref_pair_weighted(f, y, w, t, skip=None):
    """Eq. (8); `skip` leaves one row's pair terms out on both sides (anchor and positive)."""
    lp, y, w = _ref_log_prob(f, t), y.tolist(), w.double().tolist()
    num = den = 0.0
    for i in range(len(y)):
        pos = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        if not pos or i == skip:
            continue
        num += sum(math.sqrt(w[i] * w[p]) * -lp[i][p] for p in pos if p != skip) / len(pos)
        den += sum(math.sqrt(w[i] * w[p]) for p in pos if p != skip) / len(pos)
    return num / den if den > 0 else 0.0


def ref_supcon(f, y, t):
    """Plain SupCon averaged over anchors that have positives."""
    return ref_anchor_weighted(f, y, torch.ones(len(y)), t)


def random_rows(n, d, n_labels, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g) * scale  # unnormalised on purpose
    y = torch.randint(0, n_labels, (n,), generator=g)
    w = torch.rand(n, generator=g) + 0.05
    return f, y, w


# ---------------------------------------------------------------- Eq. (4), (9)

@pytest.mark.parametrize("u,k,d", [(7, 10, 16), (20, 100, 32), (1, 2, 4)])
def test_prototype_probs_matches_reference(u, k, d):
    g = torch.Generator().manual_seed(u * k)
    z, c = torch.randn(u, d, generator=g) * 5, torch.randn(k, d, generator=g)
    for t in (0.1, 0.5):
        got = prototype_probs(z, c, t)
        assert got.dtype == torch.float32 and got.shape == (u, k)
        torch.testing.assert_close(got.double(), ref_probs(z, c, t), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [10, 100])
def test_entropy_matches_reference(k):
    g = torch.Generator().manual_seed(k)
    p = torch.softmax(torch.randn(9, k, generator=g) * 4, 1)
    p[0] = 0
    p[0, 3] = 1  # one-hot: 0 log 0 = 0, H = 0
    torch.testing.assert_close(entropy(p).double(), ref_entropy(p), atol=1e-5, rtol=1e-5)
    assert entropy(p)[0] == 0
    uniform = torch.full((1, k), 1.0 / k)
    assert entropy(uniform).item() == pytest.approx(math.log(k), rel=1e-5)


# ---------------------------------------------------------------- Eqs. (5), (7), (10)-(14)

@pytest.mark.parametrize("k", [10, 100])
@pytest.mark.parametrize("beta", [None, 0.2, 0.4])
@pytest.mark.parametrize("weighting", ["exp", "linear", "unique-exp"])
def test_assign_pseudo_labels_matches_reference(k, beta, weighting):
    g = torch.Generator().manual_seed(k + int(10 * (beta or 0)))
    # a spread of sharpness so that confident, entropy-selected and unconfident rows all occur
    sharp = torch.linspace(0.5, 30, 64)[:, None]
    p = torch.softmax(torch.randn(64, k, generator=g) * sharp, 1)
    labels, weights = assign_pseudo_labels(p, 0.95, beta, 0.2, weighting)
    ref_l, ref_w = ref_assign(p, 0.95, beta, 0.2, weighting)
    assert labels.dtype == torch.long
    assert labels.tolist() == ref_l
    torch.testing.assert_close(weights.double(), torch.tensor(ref_w, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    kinds = {("uniq" if l >= k else "conf" if p[i].max() >= 0.95 else "ent")
             for i, (l, w) in enumerate(zip(ref_l, ref_w))}
    assert {"conf", "uniq"} <= kinds and (beta is None or "ent" in kinds)


def test_entropy_weight_endpoints():
    """exp(-k H) is 1 at H = 0 and lambda at H = H_th; linear likewise."""
    lam, beta, k = 0.2, 0.5, 4
    h_th = beta * math.log(k)
    # two-class-mass rows with a chosen entropy: p = (a, 1-a, 0, 0)
    def row_with_entropy(h):
        lo, hi = 0.5, 1.0
        for _ in range(200):
            a = (lo + hi) / 2
            ha = -(a * math.log(a) + (1 - a) * math.log(1 - a))
            lo, hi = (a, hi) if ha > h else (lo, a)
        return [a, 1 - a, 0.0, 0.0]
    p = torch.tensor([row_with_entropy(h_th * (1 - 1e-6)), row_with_entropy(1e-7)],
                     dtype=torch.float64)
    for weighting in ("exp", "linear"):
        _, w = assign_pseudo_labels(p, threshold=1.0, entropy_ratio=beta, low_weight=lam,
                                    weighting=weighting)
        assert w[0].item() == pytest.approx(lam, abs=1e-4)
        assert w[1].item() == pytest.approx(1.0, abs=1e-4)


def test_unique_exp_weights_selected_one_and_the_rest_lambda_at_h_th_and_below():
    """The other reading of Eqs. (12)-(14): entropy-selected weight exactly 1; an unselected
    sample weighs lambda at H = H_th, less above, lambda^(1/beta) when uniform; [G]'s rule
    (no beta) and the confident samples are unchanged."""
    lam, k = 0.2, 4
    uniform = torch.full((1, k), 1.0 / k)
    sel = torch.tensor([[0.8, 0.2, 0.0, 0.0]])  # H = 0.500 < H_th = 0.5 log 4 = 0.693
    between = torch.tensor([[0.5, 0.3, 0.2, 0.0]])  # H = 1.03: above H_th, below log 4
    conf = torch.tensor([[0.97, 0.01, 0.01, 0.01]])
    p = torch.cat([sel, between, uniform, conf])
    labels, w = assign_pseudo_labels(p, 0.95, 0.5, lam, "unique-exp")
    assert labels.tolist() == [0, k + 1, k + 2, 0]
    assert w[0].item() == 1.0 and w[3].item() == 1.0
    h_th = 0.5 * math.log(k)
    h_b = -sum(v * math.log(v) for v in between[0].tolist() if v > 0)
    assert w[1].item() == pytest.approx(lam ** (h_b / h_th), rel=1e-5) and w[1] < lam
    assert w[2].item() == pytest.approx(lam ** (1 / 0.5), rel=1e-5)  # uniform: lambda^(1/beta)
    labels_g, w_g = assign_pseudo_labels(p, 0.95, None, lam, "unique-exp")
    assert w_g.tolist() == pytest.approx([lam, lam, lam, 1.0])
    # beta = 1: only the uniform row reaches H_th = log K, where the weight is lambda
    _, w1 = assign_pseudo_labels(uniform, 0.95, 1.0, lam, "unique-exp")
    assert w1.item() == pytest.approx(lam, rel=1e-5)


def test_unique_exp_makes_eq8_eq6_within_each_class():
    """With every same-label row at equal weight, sqrt(w_i w_p) = w_i: Eq. (8) and Eq. (6) then
    differ only in their normaliser (docs/method.md), which here is the same: equal losses."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(24, 10, generator=g) * torch.linspace(0.5, 20, 24)[:, None], 1)
    pl, pw = assign_pseudo_labels(p, 0.95, 0.4, 0.2, "unique-exp")
    assert ((pl < 10) & (pw == 1)).sum() > 0 and ((pl >= 10) & (pw < 0.2)).sum() > 0
    f, y, w = contrastive_batch(torch.randn(10, 8, generator=g), torch.randn(6, 8, generator=g),
                                torch.arange(6) % 10, torch.randn(24, 8, generator=g),
                                torch.randn(24, 8, generator=g), pl, pw)
    torch.testing.assert_close(pair_weighted_supcon(f, y, w), anchor_weighted_supcon(f, y, w))


def test_baseline_never_selects_by_entropy_and_labels_are_unique():
    p = torch.softmax(torch.randn(50, 10) * 3, 1)
    labels, weights = assign_pseudo_labels(p, 0.95, None, 0.2)
    conf = p.max(1).values >= 0.95
    assert torch.all(weights[~conf] == 0.2) and torch.all(weights[conf] == 1)
    uniq = labels[~conf]
    assert torch.all(uniq >= 10) and len(set(uniq.tolist())) == len(uniq)
    assert uniq.tolist() == (torch.nonzero(~conf).squeeze(1) + 10).tolist()


def test_unconfident_views_are_each_others_only_positive():
    k = 10
    protos = torch.randn(k, 8)
    p = torch.full((3, k), 1.0 / k)  # all unconfident, maximal entropy
    pl, pw = assign_pseudo_labels(p, entropy_ratio=0.2)
    z_lb, y_lb = torch.randn(2, 8), torch.tensor([1, 2])
    f, y, w = contrastive_batch(protos, z_lb, y_lb, torch.randn(3, 8), torch.randn(3, 8), pl, pw)
    for j in range(3):
        row = k + 2 + j
        mates = [i for i in range(len(y)) if i != row and y[i] == y[row]]
        assert mates == [k + 2 + 3 + j]
    torch.testing.assert_close(w, torch.tensor([1.0] * (k + 2) + [0.2] * 6))


# ---------------------------------------------------------------- Eqs. (6), (8)

@pytest.mark.parametrize("n,d,n_labels", [(12, 8, 3), (40, 16, 10), (30, 128, 100), (5, 4, 5)])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_losses_match_reference(n, d, n_labels, t):
    f, y, w = random_rows(n, d, n_labels, seed=n + d)
    got_a = anchor_weighted_supcon(f, y, w, t)
    got_p = pair_weighted_supcon(f, y, w, t)
    assert got_a.dtype == torch.float32 and got_a.dim() == 0
    assert got_a.item() == pytest.approx(ref_anchor_weighted(f, y, w, t), rel=1e-4, abs=1e-5)
    assert got_p.item() == pytest.approx(ref_pair_weighted(f, y, w, t), rel=1e-4, abs=1e-5)


def test_losses_on_a_realistic_batch_with_absent_classes():
    """[prototypes; labeled; strong1; strong2] with K=100, many classes absent from the batch."""
    k, b, u, d = 100, 6, 10, 32
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(k, d, generator=g)
    p = torch.softmax(torch.randn(u, k, generator=g) * torch.linspace(1, 40, u)[:, None], 1)
    pl, pw = assign_pseudo_labels(p, 0.95, 0.2)
    f, y, w = contrastive_batch(protos, torch.randn(b, d, generator=g),
                                torch.tensor([3, 3, 7, 50, 99, 0]),
                                torch.randn(u, d, generator=g), torch.randn(u, d, generator=g),
                                pl, pw)
    assert f.shape == (k + b + 2 * u, d)
    assert anchor_weighted_supcon(f, y, w).item() == pytest.approx(
        ref_anchor_weighted(f, y, w, 0.1), rel=1e-4)
    assert pair_weighted_supcon(f, y, w).item() == pytest.approx(
        ref_pair_weighted(f, y, w, 0.1), rel=1e-4)


def test_equal_weights_reduce_to_supcon_and_scaling_changes_nothing():
    f, y, w = random_rows(30, 16, 6, seed=1)
    ones = torch.ones(30)
    sup = ref_supcon(f, y, 0.1)
    for c in (1.0, 0.3, 7.0):
        assert anchor_weighted_supcon(f, y, ones * c).item() == pytest.approx(sup, rel=1e-5)
        assert pair_weighted_supcon(f, y, ones * c).item() == pytest.approx(sup, rel=1e-5)
    for loss in (anchor_weighted_supcon, pair_weighted_supcon):
        assert loss(f, y, w * 13.0).item() == pytest.approx(loss(f, y, w).item(), rel=1e-5)


def test_zero_weight_row_neither_anchors_nor_is_a_positive_in_eq8():
    f, y, w = random_rows(20, 8, 4, seed=2)
    r = 5
    w[r] = 0
    got = pair_weighted_supcon(f, y, w).item()
    assert got == pytest.approx(ref_pair_weighted(f, y, w, 0.1, skip=r), rel=1e-5)
    # and it is not the plain formula with the row's weight ignored
    assert got != pytest.approx(ref_pair_weighted(f, y, torch.where(w == 0, 1.0, w), 0.1), rel=1e-3)


def test_rows_without_positives_are_left_out():
    f, y, w = random_rows(10, 8, 3, seed=3)
    y_extra = torch.cat([y, torch.tensor([777])])  # a row whose label no other row has
    f_extra = torch.cat([f, torch.randn(1, 8)])
    for loss, ref in ((anchor_weighted_supcon, ref_anchor_weighted),
                      (pair_weighted_supcon, ref_pair_weighted)):
        got = loss(f_extra, y_extra, torch.cat([w, torch.tensor([5.0])])).item()
        assert got == pytest.approx(ref(f_extra, y_extra, torch.cat([w, torch.tensor([5.0])]), 0.1),
                                    rel=1e-5)


@pytest.mark.parametrize("loss", [anchor_weighted_supcon, pair_weighted_supcon])
def test_no_positive_at_all_gives_zero_loss_that_backpropagates(loss):
    f = torch.randn(6, 8, requires_grad=True)
    out = loss(f, torch.arange(6), torch.ones(6))
    out.backward()
    assert out.item() == 0 and torch.isfinite(f.grad).all()
    f1 = torch.randn(1, 8, requires_grad=True)  # a single row
    out1 = loss(f1, torch.tensor([0]), torch.ones(1))
    out1.backward()
    assert out1.item() == 0 and torch.isfinite(f1.grad).all()
    f2 = torch.randn(4, 8, requires_grad=True)  # positives exist but every weight is 0
    out2 = loss(f2, torch.tensor([0, 0, 1, 1]), torch.zeros(4))
    out2.backward()
    assert out2.item() == 0 and torch.isfinite(f2.grad).all()


@pytest.mark.parametrize("loss", [anchor_weighted_supcon, pair_weighted_supcon])
def test_gradients_finite_and_match_float64(loss):
    f, y, w = random_rows(25, 16, 5, seed=4)
    f32 = f.clone().requires_grad_(True)
    f64 = f.double().clone().requires_grad_(True)
    loss(f32, y, w).backward()
    loss(f64, y, w.double()).backward()
    assert torch.isfinite(f32.grad).all()
    torch.testing.assert_close(f32.grad.double(), f64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss", [anchor_weighted_supcon, pair_weighted_supcon])
def test_half_inputs_and_autocast_compute_in_float32(loss):
    f, y, w = random_rows(40, 32, 6, seed=5)
    ref = loss(f, y, w).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(f, y, w)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref, rel=1e-5)
    out_bf16 = loss(f.bfloat16(), y, w.bfloat16())  # bf16 inputs: rounding of inputs only
    assert out_bf16.dtype == torch.float32
    assert out_bf16.item() == pytest.approx(ref, rel=2e-2)
    out_f16 = loss(f.half(), y, w.half())
    assert out_f16.item() == pytest.approx(ref, rel=5e-3)


def test_prototype_probs_under_autocast_is_float32():
    z, c = torch.randn(8, 16), torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = prototype_probs(z, c)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, prototype_probs(z, c))


def test_large_logits_are_stable():
    f = torch.randn(16, 8)
    y = torch.randint(0, 3, (16,))
    for loss in (anchor_weighted_supcon, pair_weighted_supcon):
        out = loss(f, y, torch.ones(16), temperature=1e-3)  # logits up to 1000
        assert torch.isfinite(out)


def test_contrastive_batch_labeled_only():
    f, y, w = contrastive_batch(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    assert f.shape == (8, 4) and y.tolist() == [0, 1, 2, 0, 1, 2, 0, 1] and w.tolist() == [1.0] * 8


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("loss", [anchor_weighted_supcon, pair_weighted_supcon])
def test_loss_bad_input(loss):
    f, y, w = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), torch.ones(6)
    bad = [
        (f[:5], y, w),                         # mismatched lengths
        (f, y[:5], w),
        (f, y, w[:5]),
        (f[None], y, w),                       # wrong rank
        (f, y[None], w),
        (f, y, w[None]),
        (f, y.float(), w),                     # non-integer labels
        (f, y, -w),                            # negative weights
        (f, y, w * float("nan")),
        (f, y, torch.ones(6, dtype=torch.long)),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            loss(*args)
    with pytest.raises(ValueError):
        loss(f, y, w, temperature=0.0)


def test_pseudo_label_bad_input():
    p = torch.softmax(torch.randn(4, 5), 1)
    with pytest.raises(ValueError, match="sum to 1"):
        assign_pseudo_labels(p * 2)
    with pytest.raises(ValueError, match="sum to 1"):
        entropy(p * 2)
    with pytest.raises(ValueError, match="weighting"):
        assign_pseudo_labels(p, entropy_ratio=0.2, weighting="cubic")
    for lam in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="low_weight"):
            assign_pseudo_labels(p, low_weight=lam)
    with pytest.raises(ValueError, match="entropy_ratio"):
        assign_pseudo_labels(p, entropy_ratio=1.5)
    with pytest.raises(ValueError, match="2-D"):
        assign_pseudo_labels(p[0])
    with pytest.raises(ValueError):
        prototype_probs(torch.randn(4, 8), torch.randn(5, 7))


# ---------------------------------------------------------------- peer methods (docs/peers.md)
# References: loops over rows and pairs in float64 torch scalars (so autograd gives reference
# gradients), written from docs/peers.md.

from losses import (ccssl_supcon, distribution_alignment, fixmatch_mask,  # noqa: E402
                    masked_cross_entropy, simmatch_targets, soft_cross_entropy)


def ref_log_softmax_rows(s, i, exclude_self=True):
    """log softmax over a != i of row i of the similarity matrix s (float64)."""
    n = s.shape[0]
    den = torch.logsumexp(torch.stack([s[i, a] for a in range(n) if a != i or not exclude_self]), 0)
    return [s[i, j] - den for j in range(n)]


def ref_ccssl(f, y, c, t):
    u = len(y)
    z = f.double()
    z = z / z.norm(dim=1, keepdim=True)
    s = z @ z.T / t
    yy, cc = y.tolist() * 2, torch.cat([c, c]).double()
    total = 0.0
    for i in range(2 * u):
        lp = ref_log_softmax_rows(s, i)
        num = den = 0.0
        for j in range(2 * u):
            if j == i or yy[j] != yy[i]:
                continue
            w = 1.0 if j == (i + u) % (2 * u) else cc[i] * cc[j]
            num = num + w * -lp[j]
            den = den + w
        total = total + num / den
    return total / (2 * u)


def ref_pair_product(f, y, w, t):
    z = f.double()
    z = z / z.norm(dim=1, keepdim=True)
    s = z @ z.T / t
    y, w = y.tolist(), w.double()
    num = den = 0.0
    for i in range(len(y)):
        pos = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        if not pos:
            continue
        lp = ref_log_softmax_rows(s, i)
        num = num + sum(w[i] * w[p] * -lp[p] for p in pos) / len(pos)
        den = den + sum(w[i] * w[p] for p in pos) / len(pos)
    return num / den


def ref_simmatch(p_w, bank_logits, labels, alpha):
    u, k = p_w.shape
    ell = bank_logits.shape[1]
    p_hat, q_hat = torch.zeros(u, k, dtype=torch.float64), torch.zeros(u, ell, dtype=torch.float64)
    for b in range(u):
        e = [math.exp(v) for v in bank_logits[b].double().tolist()]
        q = [v / sum(e) for v in e]
        un = [q[j] * float(p_w[b, labels[j]]) for j in range(ell)]
        q_hat[b] = torch.tensor([v / sum(un) for v in un])
        for kk in range(k):
            a = sum(q[j] for j in range(ell) if labels[j] == kk)
            p_hat[b, kk] = alpha * float(p_w[b, kk]) + (1 - alpha) * a
    return p_hat, q_hat


def peer_inputs(u, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(2 * u, d, generator=g)
    y = torch.randint(0, k, (u,), generator=g)
    c = torch.rand(u, generator=g)
    return f, y, c


@pytest.mark.parametrize("u, k", [(12, 10), (16, 100), (10, 3)])
def test_ccssl_supcon_matches_reference_values_and_gradients(u, k):
    f, y, c = peer_inputs(u, k, 8, seed=u + k)
    f32 = f.clone().requires_grad_(True)
    f64 = f.double().requires_grad_(True)
    got = ccssl_supcon(f32, y, c, 0.07)
    ref = ref_ccssl(f64, y, c, 0.07)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    got.backward()
    ref.backward()
    torch.testing.assert_close(f32.grad.double(), f64.grad, rtol=1e-4, atol=1e-5)


def test_ccssl_with_full_confidence_is_class_aware_supcon():
    f, y, _ = peer_inputs(10, 3, 8, seed=1)
    got = ccssl_supcon(f, y, torch.ones(10), 0.07)
    ref = ref_supcon(f, torch.cat([y, y]), 0.07)  # every row has a positive: its other view
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_ccssl_with_distinct_labels_is_instance_discrimination():
    f, _, c = peer_inputs(6, 6, 8, seed=2)
    y = torch.arange(6)
    lp = _ref_log_prob(f, 0.07)
    simclr = sum(-lp[i][(i + 6) % 12] for i in range(12)) / 12  # NT-Xent between the two views
    assert ccssl_supcon(f, y, c, 0.07).item() == pytest.approx(simclr, rel=1e-5)


@pytest.mark.parametrize("n, k", [(30, 10), (120, 100)])
def test_pair_product_matches_reference(n, k):
    g = torch.Generator().manual_seed(n)
    f = torch.randn(n, 8, generator=g)
    y = torch.randint(0, k // 3 + 2, (n,), generator=g)
    w = torch.rand(n, generator=g)
    f32, f64 = f.clone().requires_grad_(True), f.double().requires_grad_(True)
    got = pair_weighted_supcon(f32, y, w, 0.1, pair="product")
    ref = ref_pair_product(f64, y, w, 0.1)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    got.backward()
    ref.backward()
    torch.testing.assert_close(f32.grad.double(), f64.grad, rtol=1e-4, atol=1e-6)
    assert abs(got - pair_weighted_supcon(f, y, w, 0.1)) > 1e-4  # and differs from geometric


def test_pair_product_equals_geometric_for_0_1_weights():
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(40, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    w = (torch.rand(40, generator=g) < 0.6).float()
    torch.testing.assert_close(pair_weighted_supcon(f, y, w, pair="product"),
                               pair_weighted_supcon(f, y, w, pair="geometric"))


@pytest.mark.parametrize("u, k, ell", [(8, 10, 40), (6, 100, 200)])
def test_simmatch_targets_match_reference(u, k, ell):
    g = torch.Generator().manual_seed(k)
    p_w = torch.softmax(torch.randn(u, k, generator=g) * 2, 1)
    logits = torch.randn(u, ell, generator=g) * 5
    labels = torch.arange(ell) % k
    p_hat, q_hat = simmatch_targets(p_w, logits, labels, 0.9)
    r_hat, r_q = ref_simmatch(p_w, logits, labels.tolist(), 0.9)
    torch.testing.assert_close(p_hat.double(), r_hat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q_hat.double(), r_q, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(p_hat.sum(1), torch.ones(u))
    torch.testing.assert_close(q_hat.sum(1), torch.ones(u))


def test_simmatch_targets_properties():
    g = torch.Generator().manual_seed(3)
    p_w = torch.softmax(torch.randn(5, 4, generator=g), 1)
    logits = torch.randn(5, 12, generator=g)
    labels = torch.arange(12) % 4
    assert torch.equal(simmatch_targets(p_w, logits, labels, alpha=1.0)[0], p_w)
    same = torch.full((12,), 2)
    p_hat, q_hat = simmatch_targets(p_w, logits, same, alpha=0.0)
    torch.testing.assert_close(p_hat, torch.eye(4)[[2] * 5])  # every bank item has label 2
    torch.testing.assert_close(q_hat, torch.softmax(logits, 1))  # unfolding by one class: q
    zero = p_w.clone()
    zero[0, 2] = 0.0  # row 0 gives nothing to the only bank label: falls back to q, no NaN
    _, q_hat = simmatch_targets(zero / zero.sum(1, keepdim=True), logits, same, 0.5)
    assert torch.isfinite(q_hat).all()
    torch.testing.assert_close(q_hat[0], torch.softmax(logits[0], 0))


def test_fixmatch_mask_masked_and_soft_cross_entropy_by_hand():
    p = torch.tensor([[0.96, 0.04], [0.5, 0.5], [0.01, 0.99]])
    mask, pl = fixmatch_mask(p, 0.95)
    assert mask.tolist() == [1.0, 0.0, 1.0] and pl.tolist() == [0, 0, 1]
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0], [0.5, -1.0]])
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(2.0)), math.log(1 + math.exp(1.5))]
    assert masked_cross_entropy(logits, pl, mask).item() == pytest.approx((ce[0] + ce[2]) / 3)
    onehot = torch.nn.functional.one_hot(pl, 2).float()
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), torch.tensor(ce))
    big = torch.tensor([[1000.0, -1000.0]])  # log of a softmax would give -inf here
    assert torch.isfinite(soft_cross_entropy(big, torch.tensor([[0.0, 1.0]]))).all()


def test_distribution_alignment_by_hand():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    mean = torch.tensor([0.5, 0.25, 0.25])
    got = distribution_alignment(p, mean)
    for b in range(2):
        a = [p[b, k].item() / 3 / mean[k].item() for k in range(3)]
        assert got[b].tolist() == pytest.approx([v / sum(a) for v in a])
    torch.testing.assert_close(distribution_alignment(p, torch.full((3,), 1 / 3)), p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_peer_losses_compute_in_float32(dtype):
    f, y, c = peer_inputs(8, 4, 8, seed=0)
    assert ccssl_supcon(f.to(dtype), y, c).dtype == torch.float32
    p_w = torch.softmax(torch.randn(8, 4), 1)
    p_hat, q_hat = simmatch_targets(p_w.to(dtype), torch.randn(8, 6).to(dtype), torch.arange(6) % 4)
    assert p_hat.dtype == q_hat.dtype == torch.float32
    assert soft_cross_entropy(torch.randn(3, 4).to(dtype), torch.rand(3, 4)).dtype == torch.float32


@pytest.mark.parametrize("call", [
    lambda: ccssl_supcon(torch.randn(7, 4), torch.zeros(4, dtype=torch.long), torch.ones(4)),
    lambda: ccssl_supcon(torch.randn(8, 4), torch.zeros(4), torch.ones(4)),
    lambda: ccssl_supcon(torch.randn(8, 4), torch.zeros(4, dtype=torch.long), torch.ones(3)),
    lambda: ccssl_supcon(torch.randn(8, 4), torch.zeros(4, dtype=torch.long), torch.full((4,), 2.0)),
    lambda: simmatch_targets(torch.full((2, 3), 1 / 3), torch.randn(2, 5), torch.arange(4)),
    lambda: simmatch_targets(torch.full((2, 3), 1 / 3), torch.randn(3, 5), torch.arange(5) % 3),
    lambda: simmatch_targets(torch.full((2, 3), 1 / 3), torch.randn(2, 5), torch.arange(5)),
    lambda: simmatch_targets(torch.full((2, 3), 1 / 3), torch.randn(2, 5), torch.arange(5) % 3, 2.0),
    lambda: pair_weighted_supcon(torch.randn(4, 3), torch.zeros(4, dtype=torch.long),
                                 torch.ones(4), pair="arithmetic"),
    lambda: masked_cross_entropy(torch.randn(3, 2), torch.zeros(2, dtype=torch.long), torch.ones(3)),
    lambda: soft_cross_entropy(torch.randn(3, 2), torch.rand(3, 3)),
    lambda: distribution_alignment(torch.rand(3, 2), torch.rand(3)),
    lambda: fixmatch_mask(torch.rand(3, 2) + 1, 0.95),
])
def test_peer_losses_bad_input(call):
    with pytest.raises(ValueError):
        call()
