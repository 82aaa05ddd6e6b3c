"""Losses of [N&O] (entropy-weighted semi-supervised contrastive learning) and its baseline [G].

Equation numbers follow docs/method.md, where the paper's lost symbols are
reconstructed:

    prototype_probs        Eq. (4)        pseudo-label probabilities from prototype similarities
    entropy                Eq. (9)        H_b = -sum_k q_bk log q_bk
    assign_pseudo_labels   Eqs. (5), (7), (10)-(14)   labels and per-sample weights
    anchor_weighted_supcon Eq. (6)        baseline loss [G], anchor weights
    pair_weighted_supcon   Eq. (8)        proposed loss [N&O], pair weights sqrt(w_i w_p)
    contrastive_batch      -              rows [prototypes; labeled; strong 1; strong 2]

The peer methods of docs/peers.md (FixMatch, CCSSL, SimMatch):

    fixmatch_mask          mask m_b = [max_k p_bk >= tau] and pseudo-label argmax_k p_bk
    masked_cross_entropy   (1/U) sum_b m_b CE(logits_b, yhat_b)
    soft_cross_entropy     H(q_b, softmax(logits_b)) per row, via log_softmax
    ccssl_supcon           CCSSL's class-aware contrastive loss, targets weighted c_i c_j
    distribution_alignment p (1/K) / mean p, renormalised (SimMatch, uniform target)
    simmatch_targets       SimMatch's label propagation through the labeled bank: p_hat, q_hat

SeMi (docs/long_tailed.md; its memory bank is state, in methods.SemiState):

    oheml_weight           hard-example weight s H(p) / log K + 1 - s
    logit_adjustment       log(pi^tau + 1e-12), the balanced head's logit adjustment
    bank_class_probs       semantic pseudo-label softmax(-||f - mu_c|| / tau_tar)
    semantic_blend         p' = (1 - a_c) p + a_c q_proto, a_c = alpha ramp pi_hat_c (not renormalised)
    feature_consistency    sharpened, centred feature target of the weak view for a strong view

Everything is vectorised over rows, runs on any device and computes in float32 even when
called with float16/bfloat16 inputs or under autocast. The public functions validate their
inputs; `validate=False` skips the checks that need a device->host copy (the training step
passes it, since its labels and weights come from `assign_pseudo_labels`).
"""
import math

import torch
import torch.nn.functional as F

WEIGHTINGS = ("exp", "linear", "unique-exp")
_SELF_FILL = -1e9  # finite stand-in for -inf on the diagonal: exp() underflows to 0, no 0*inf NaN in backward


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype != torch.float64 else x


def _no_autocast(t: torch.Tensor):
    # the losses are a few small matmuls: float32 costs nothing and keeps log-sum-exp exact
    return torch.autocast(device_type=t.device.type, enabled=False)


def _check_rows(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                validate: bool) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must be 2-D (rows, dim), got shape {tuple(features.shape)}")
    if labels.dim() != 1 or weights.dim() != 1:
        raise ValueError(f"labels and weights must be 1-D, got shapes {tuple(labels.shape)} "
                         f"and {tuple(weights.shape)}")
    n = features.shape[0]
    if labels.shape[0] != n or weights.shape[0] != n:
        raise ValueError(f"features, labels and weights must have the same number of rows, got "
                         f"{n}, {labels.shape[0]} and {weights.shape[0]}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be a floating-point tensor, got dtype {weights.dtype}")
    if validate and n > 0 and not bool(torch.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError("weights must be finite and non-negative")


def _check_probs(probs: torch.Tensor, validate: bool) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must be 2-D (samples, classes), got shape {tuple(probs.shape)}")
    if not probs.dtype.is_floating_point:
        raise ValueError(f"probs must be floating point, got dtype {probs.dtype}")
    if validate and probs.numel() > 0:
        tol = 1e-3 if probs.dtype in (torch.float32, torch.float64) else 2e-2
        p = _f32(probs)
        if not bool((p >= -tol).all()) or not bool(((p.sum(1) - 1).abs() <= tol).all()):
            raise ValueError(f"probs must be non-negative rows that sum to 1 (tolerance {tol}); "
                             "pass softmax outputs, e.g. from prototype_probs")


def prototype_probs(z_weak: torch.Tensor, prototypes: torch.Tensor,
                    temperature: float = 0.1) -> torch.Tensor:
    """Eq. (4): q_b = softmax_k(cos(z^w_b, c_k) / T_pl). Both inputs are L2-normalised here.

    Returns float32 probabilities of shape (U, K). Call it without gradient (the targets).
    """
    if z_weak.dim() != 2 or prototypes.dim() != 2 or z_weak.shape[1] != prototypes.shape[1]:
        raise ValueError(f"z_weak (U, D) and prototypes (K, D) must be 2-D with the same D, got "
                         f"{tuple(z_weak.shape)} and {tuple(prototypes.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with _no_autocast(z_weak):
        z = F.normalize(_f32(z_weak), dim=1)
        c = F.normalize(_f32(prototypes), dim=1)
        return torch.softmax(z @ c.T / temperature, dim=1)


def entropy(probs: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Eq. (9): H_b = -sum_k q_bk log q_bk, natural log, with 0 log 0 = 0. Returns (U,) float32."""
    _check_probs(probs, validate)
    with _no_autocast(probs):
        p = _f32(probs)
        return -torch.special.xlogy(p, p).sum(1)


def assign_pseudo_labels(probs: torch.Tensor, threshold: float = 0.95,
                         entropy_ratio: float | None = None, low_weight: float = 0.2,
                         weighting: str = "exp", validate: bool = True,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and weights of the unlabeled samples, Eqs. (5), (7) and (10)-(14).

    - confident (max_k q_bk >= threshold): label argmax_k q_bk, weight 1            (Eqs. 5, 7)
    - else, if entropy_ratio=beta is given and H_b < H_th = beta log K: label argmax, weight
      exp(-k H_b) with k = ln(1/lambda)/H_th (1 at H=0, lambda at H_th), or with
      weighting="linear" 1 - (1 - lambda) H_b/H_th                                  (Eqs. 10-14)
    - else: the unique label K + b (shared by the sample's two strong views), weight lambda.

    weighting="unique-exp" is the other reading of Eqs. (12)-(14) (docs/method.md): an
    entropy-selected sample gets weight 1, like a confident one (Eq. 12), and the remaining
    unique-label samples get exp(-k H_b), the same k, i.e. lambda at H_th and less above it.

    entropy_ratio=None is the baseline rule of [G]. Returns (LongTensor[U], float32 Tensor[U]).
    """
    _check_probs(probs, validate)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not 0 < low_weight <= 1:
        raise ValueError(f"low_weight (lambda) must be in (0, 1], got {low_weight}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if entropy_ratio is not None and not 0 < entropy_ratio <= 1:
        raise ValueError(f"entropy_ratio (beta) must be in (0, 1] or None, got {entropy_ratio}")
    u, k = probs.shape
    if entropy_ratio is not None and k < 2:
        raise ValueError("entropy selection needs at least 2 classes (H_max = log K)")
    with _no_autocast(probs):
        p = _f32(probs)
        conf, pred = p.max(dim=1)
        confident = conf >= threshold
        unique = torch.arange(u, device=p.device) + k
        labels = torch.where(confident, pred, unique)
        weights = torch.where(confident, 1.0, torch.full_like(conf, low_weight))
        if entropy_ratio is None:
            return labels, weights
        h = entropy(p, validate=False)
        h_th = entropy_ratio * math.log(k)
        selected = ~confident & (h < h_th)
        k_h = math.log(1.0 / low_weight) / h_th
        if weighting == "unique-exp":  # Eq. (12): selected -> 1; Eqs. (13)-(14): the rest decay
            w_unique = torch.where(confident, 1.0, torch.exp(-k_h * h))
            return torch.where(selected, pred, labels), torch.where(selected, 1.0, w_unique)
        if weighting == "exp":
            w_ent = torch.exp(-(math.log(1.0 / low_weight) / h_th) * h)
        else:
            w_ent = 1.0 - (1.0 - low_weight) * h / h_th
        return torch.where(selected, pred, labels), torch.where(selected, w_ent, weights)


def _logits_lse_positives(features: torch.Tensor, labels: torch.Tensor, temperature: float):
    """s_ij = z_i.z_j / T with s_ii masked, lse_i = log sum_{a != i} exp(s_ia), and the positive
    mask P (float). -l_ip = lse_i - s_ip is never materialised: sums over p are taken as
    sum_p W_ip (-l_ip) = lse_i sum_p W_ip - sum_p W_ip s_ip, which saves two N x N passes."""
    z = F.normalize(_f32(features), dim=1)
    logits = (z / temperature) @ z.T
    logits.diagonal().fill_(_SELF_FILL)  # in place: N writes instead of an N x N mask pass
    lse = torch.logsumexp(logits, dim=1)  # removes the row max internally
    pos = (labels[:, None] == labels[None, :]).to(logits.dtype)
    pos.diagonal().fill_(0.0)
    return logits, lse, pos


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # an empty anchor set gives num = den = 0: return 0 with a finite (zero) gradient, not NaN
    return num / torch.where(den > 0, den, torch.ones_like(den))


def anchor_weighted_supcon(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                           temperature: float = 0.1, validate: bool = True) -> torch.Tensor:
    """Eq. (6), the baseline loss of [G]:

        L_base = sum_{i in I'} w_i (-(1/|P(i)|) sum_{p in P(i)} l_ip) / sum_{i in I'} w_i

    with l_ip = s_ip - log sum_{a != i} exp(s_ia), s = z z^T / T, P(i) = {p != i: y_p = y_i},
    I' = rows with at least one positive. Returns a float32 scalar (0 when the denominator is 0).
    """
    _check_rows(features, labels, weights, validate)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with _no_autocast(features):
        logits, lse, pos = _logits_lse_positives(features, labels, temperature)
        n_pos = pos.sum(1)
        w = _f32(weights) * (n_pos > 0)
        mean_neg_lp = lse - (pos * logits).sum(1) / n_pos.clamp(min=1)
        return _safe_ratio((w * mean_neg_lp).sum(), w.sum())


PAIRS = ("geometric", "product")


def pair_weighted_supcon(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                         temperature: float = 0.1, validate: bool = True,
                         pair: str = "geometric") -> torch.Tensor:
    """Eq. (8), the proposed loss of [N&O]: pair weight sqrt(w_i w_p) for anchor i, positive p,

        L_ent = sum_{i in I'} (1/|P(i)|) sum_p sqrt(w_i w_p) (-l_ip) / sum_{i in I'} wbar_i,
        wbar_i = (1/|P(i)|) sum_p sqrt(w_i w_p),

    l_ip, P(i) and I' as in Eq. (6). pair="product" uses CCSSL's w_i w_p instead, in the
    numerator and the normaliser alike (docs/peers.md, ablation). Returns a float32 scalar (0 when the
    denominator is 0).
    """
    _check_rows(features, labels, weights, validate)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if pair not in PAIRS:
        raise ValueError(f"pair must be one of {PAIRS}, got {pair!r}")
    with _no_autocast(features):
        logits, lse, pos = _logits_lse_positives(features, labels, temperature)
        sw = _f32(weights).sqrt() if pair == "geometric" else _f32(weights)
        pair_w = pos * (sw[:, None] * sw[None, :])
        inv_n_pos = 1.0 / pos.sum(1).clamp(min=1)  # rows without positives have pair_w = 0
        w_sum = pair_w.sum(1)
        num = ((lse * w_sum - (pair_w * logits).sum(1)) * inv_n_pos).sum()
        return _safe_ratio(num, (w_sum * inv_n_pos).sum())


LOSSES = {"base": anchor_weighted_supcon, "entropy": pair_weighted_supcon}


def contrastive_batch(prototypes: torch.Tensor, z_lb: torch.Tensor, y_lb: torch.Tensor,
                      z_ulb_s1: torch.Tensor | None = None, z_ulb_s2: torch.Tensor | None = None,
                      pseudo_labels: torch.Tensor | None = None,
                      pseudo_weights: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows Z = [prototypes; z^x; z^1; z^2] with labels [0..K-1; y; yhat; yhat] and weights
    [1; 1; w; w] (docs/method.md). The unlabeled parts may be None (labeled-only training)."""
    k = prototypes.shape[0]
    dev = prototypes.device
    feats = [prototypes, z_lb]
    labels = [torch.arange(k, device=dev), y_lb.long()]
    weights = [torch.ones(k + z_lb.shape[0], device=dev)]
    if z_ulb_s1 is not None:
        if pseudo_labels is None or pseudo_weights is None or z_ulb_s2 is None:
            raise ValueError("z_ulb_s1, z_ulb_s2, pseudo_labels and pseudo_weights go together")
        feats += [z_ulb_s1, z_ulb_s2]
        labels += [pseudo_labels, pseudo_labels]
        weights += [pseudo_weights.float(), pseudo_weights.float()]
    dtype = torch.promote_types(prototypes.dtype, z_lb.dtype)
    return (torch.cat([f.to(dtype) for f in feats]), torch.cat(labels), torch.cat(weights))


# ---------------------------------------------------------------- peer methods (docs/peers.md)

def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 2-D floating-point tensor (rows, classes), got shape "
                         f"{tuple(t.shape)} and dtype {t.dtype}")


def _check_int(name: str, t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def fixmatch_mask(probs: torch.Tensor, threshold: float = 0.95,
                  validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's confidence mask m_b = [max_k p_bk >= tau] (float32 0/1) and pseudo-label
    yhat_b = argmax_k p_bk (long), from the teacher probabilities p of the weak view."""
    _check_probs(probs, validate)
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold (p_cutoff) must be in [0, 1], got {threshold}")
    conf, pseudo = _f32(probs).max(dim=1)
    return (conf >= threshold).float(), pseudo


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """(1/U) sum_b m_b CE(logits_b, yhat_b): FixMatch's unlabeled loss, averaged over the whole
    unlabeled batch (masked-out samples count in the denominator, as in FixMatch). float32."""
    _check_2d("logits", logits)
    _check_int("labels", labels)
    if labels.shape != logits.shape[:1] or mask.shape != logits.shape[:1]:
        raise ValueError(f"labels and mask must have shape ({logits.shape[0]},), got "
                         f"{tuple(labels.shape)} and {tuple(mask.shape)}")
    with _no_autocast(logits):
        ce = F.cross_entropy(_f32(logits), labels.long(), reduction="none")
        return (ce * _f32(mask)).sum() / max(len(ce), 1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """H(q_b, softmax(logits_b)) = -sum_k q_bk log softmax(logits_b)_k per row, with log_softmax
    (never the log of a softmax, which underflows to -inf). Returns float32 (rows,)."""
    _check_2d("logits", logits)
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the logits' shape {tuple(logits.shape)}, got "
                         f"{tuple(targets.shape)}")
    with _no_autocast(logits):
        return -(_f32(targets) * torch.log_softmax(_f32(logits), dim=1)).sum(1)


def ccssl_supcon(features: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor,
                 temperature: float = 0.07, validate: bool = True) -> torch.Tensor:
    """CCSSL's class-aware contrastive loss (docs/peers.md) over rows [z^1; z^2] (2U, D):

        l_i = -sum_j pos_ij W_ij log softmax_{a != i}(z_i.z_a / T)_j / sum_j pos_ij W_ij

    pos_ij = [j != i, yhat_j = yhat_i] (the other view of the same image always is one);
    W_ij = c_i c_j, except W_ij = 1 for the two views of one image; L = mean_i l_i.
    labels (U,) and confidence (U,) are per image; features are L2-normalised here."""
    if features.dim() != 2 or labels.dim() != 1 or confidence.dim() != 1:
        raise ValueError(f"features must be (2U, D), labels and confidence (U,), got "
                         f"{tuple(features.shape)}, {tuple(labels.shape)}, {tuple(confidence.shape)}")
    u = labels.shape[0]
    if features.shape[0] != 2 * u or confidence.shape[0] != u:
        raise ValueError(f"features must have 2U = {2 * u} rows ([view 1; view 2]) and confidence "
                         f"U = {u}, got {features.shape[0]} and {confidence.shape[0]}")
    _check_int("labels", labels)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if validate and u and not bool(((confidence >= 0) & (confidence <= 1)).all()):
        raise ValueError("confidence must lie in [0, 1] (the teacher's max probability)")
    with _no_autocast(features):
        logits, lse, pos = _logits_lse_positives(features, torch.cat([labels, labels]), temperature)
        c = _f32(torch.cat([confidence, confidence]))
        w = pos * (c[:, None] * c[None, :])
        idx = torch.arange(2 * u, device=features.device)
        w[idx, (idx + u) % (2 * u)] = 1.0  # the two views of one image: full weight
        w_sum = w.sum(1)  # >= 1, since the other view is always a positive
        return ((lse * w_sum - (w * logits).sum(1)) / w_sum).sum() / max(2 * u, 1)


def distribution_alignment(probs: torch.Tensor, mean_probs: torch.Tensor) -> torch.Tensor:
    """SimMatch / USB distribution alignment to a uniform target: p (1/K) / mean_p, renormalised
    per row. mean_probs (K,) is the mean of the queued batch-mean teacher probabilities."""
    _check_2d("probs", probs)
    if mean_probs.shape != probs.shape[1:]:
        raise ValueError(f"mean_probs must have shape ({probs.shape[1]},), got "
                         f"{tuple(mean_probs.shape)}")
    with _no_autocast(probs):
        p = _f32(probs) / _f32(mean_probs).clamp(min=1e-12) / probs.shape[1]
        return p / p.sum(1, keepdim=True).clamp(min=1e-30)


def simmatch_targets(probs_w: torch.Tensor, bank_logits: torch.Tensor, bank_labels: torch.Tensor,
                     alpha: float = 0.9, validate: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """SimMatch's label propagation through the labeled memory bank (docs/peers.md):

        q = softmax(bank_logits)  (U, L),  bank_logits = z^w . bank^T / t
        unfolding    q_hat_bj = q_bj p_w[b, label_j] / sum_j' q_bj' p_w[b, label_j']
        aggregation  a_bk = sum_{j: label_j = k} q_bj,   p_hat = alpha p_w + (1 - alpha) a

    Returns float32 (p_hat (U, K), q_hat (U, L)). A row whose p_w gives zero to every bank
    label would make q_hat 0/0; it falls back to q."""
    _check_probs(probs_w, validate)
    _check_2d("bank_logits", bank_logits)
    _check_int("bank_labels", bank_labels)
    if bank_logits.shape[0] != probs_w.shape[0] or bank_labels.shape != bank_logits.shape[1:]:
        raise ValueError(f"bank_logits must be (U={probs_w.shape[0]}, L) and bank_labels (L,), got "
                         f"{tuple(bank_logits.shape)} and {tuple(bank_labels.shape)}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    k = probs_w.shape[1]
    if validate and bank_labels.numel() and not bool(((bank_labels >= 0) & (bank_labels < k)).all()):
        raise ValueError(f"bank_labels must lie in [0, {k})")
    with _no_autocast(probs_w):
        p_w = _f32(probs_w)
        q = torch.softmax(_f32(bank_logits), dim=1)
        # (L, K) one-hot by comparison: the scatter as a matmul (F.one_hot checks the label range,
        # which reads the labels back to the host)
        onehot = (bank_labels.long()[:, None] == torch.arange(k, device=q.device)).to(q.dtype)
        unfolded = q * (p_w @ onehot.T)
        norm = unfolded.sum(1, keepdim=True)
        q_hat = torch.where(norm > 0, unfolded / norm.clamp(min=1e-30), q)
        return alpha * p_w + (1 - alpha) * (q @ onehot), q_hat


def oheml_weight(probs: torch.Tensor, s: float, validate: bool = True) -> torch.Tensor:
    """SeMi's entropy hard-example weight (docs/long_tailed.md): w_b = s H(p_b) / log K + (1 - s),
    1 - s for a one-hot p_b (easy), 1 for the uniform one (hard) -- the opposite direction to [N&O]'s
    entropy weighting. Returns float32 (U,)."""
    _check_probs(probs, validate)
    if not 0 <= s <= 1:
        raise ValueError(f"s must be in [0, 1], got {s}")
    k = probs.shape[1]
    if k < 2:
        raise ValueError("the entropy weight needs at least 2 classes (H_max = log K)")
    return s * entropy(probs, validate=False) / math.log(k) + (1.0 - s)


# ---------------------------------------------------------------- Roda & Geva's clustering losses
# Equation numbers are theirs (docs/active_learning.md): a DEC clustering layer on the CAE's
# latent z, their cluster contrastive loss on the labeled latents, the entropy query.

def _check_latent(z: torch.Tensor, mu: torch.Tensor) -> None:
    if z.dim() != 2 or mu.dim() != 2 or z.shape[1] != mu.shape[1]:
        raise ValueError(f"latents z (N, D) and centroids mu (K, D) must be 2-D with the same D, "
                         f"got {tuple(z.shape)} and {tuple(mu.shape)}")


def soft_assign(z: torch.Tensor, mu: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Eq. (1), DEC's Student's t kernel: q_ij = (1 + |z_i - mu_j|^2 / alpha)^(-(alpha+1)/2),
    normalised over j. alpha = 1 gives (1 + d^2)^-1. Returns (N, K) in float32 (float64 stays)."""
    _check_latent(z, mu)
    with _no_autocast(z):
        d2 = torch.cdist(_f32(z), _f32(mu)).square()  # cdist, not the expanded |z|^2 - 2 z.mu ...
        q = (1 + d2 / alpha).pow(-(alpha + 1) / 2)     # ... which cancels badly for close points
        return q / q.sum(1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """Eq. (3): p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'), f_j = sum_i q_ij (soft cluster
    frequencies over the rows given, i.e. the whole pool). Call it without gradient."""
    _check_probs(q, validate=False)
    w = _f32(q).square() / _f32(q).sum(0)
    return w / w.sum(1, keepdim=True)


def kl_clustering(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Eq. (2): L_clu = KL(P || Q) = sum_i sum_j p_ij log(p_ij / q_ij), here averaged over the rows
    (DCEC's Keras 'kld': summed over clusters, mean over the batch). 0 log 0 = 0."""
    if p.shape != q.shape or p.dim() != 2:
        raise ValueError(f"P and Q must be 2-D of the same shape, got {tuple(p.shape)} and "
                         f"{tuple(q.shape)}")
    p, q = _f32(p), _f32(q)
    return (torch.special.xlogy(p, p) - p * torch.log(q.clamp_min(1e-30))).sum(1).mean()


def cluster_contrastive(z_lb: torch.Tensor, y_lb: torch.Tensor, mu: torch.Tensor,
                        tau: float = 1.0, include_positive: bool = False) -> torch.Tensor:
    """Eq. (7), the cluster contrastive loss on labeled latents:
        L_ccl = - sum_c sum_{i in I_c} log[ exp(z_i . mu_c / tau) / sum_{z' in I_c'} exp(z' . mu_c / tau) ]
    I_c the labeled rows of class c, I_c' the labeled rows of every other class. As printed the
    positive is not in the denominator (include_positive=False); include_positive=True is the
    InfoNCE form exp(s_i) / (exp(s_i) + sum_{z'} exp(s')), bounded below by 0. Averaged over the
    labeled rows (the sum of the paper divided by the batch, so its weight does not scale with the
    batch). A class with no negative in the batch contributes nothing (its denominator is empty).
    """
    _check_latent(z_lb, mu)
    if y_lb.dim() != 1 or len(y_lb) != len(z_lb) or y_lb.dtype.is_floating_point:
        raise ValueError(f"labels must be 1-D integers, one per latent row, got {tuple(y_lb.shape)} "
                         f"{y_lb.dtype} for {len(z_lb)} rows")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    with _no_autocast(z_lb):
        s = _f32(z_lb) @ _f32(mu).T / tau                              # (B, K): s[i, c] = z_i . mu_c / tau
        neg = y_lb[:, None] != torch.arange(len(mu), device=y_lb.device)  # row i is a negative of c
        has_neg = neg.any(0)                                             # (K,)
        # a finite fill keeps backward NaN-free; columns without negatives are dropped below
        lse_neg = torch.logsumexp(s.masked_fill(~neg, _SELF_FILL), 0)    # (K,) over the negatives
        pos = s.gather(1, y_lb[:, None]).squeeze(1)                      # s[i, y_i]
        den = lse_neg[y_lb]
        if include_positive:
            den = torch.logaddexp(den, pos)
        term = torch.where(has_neg[y_lb], den - pos, torch.zeros_like(pos))
        return term.sum() / max(len(z_lb), 1)


# ---------------------------------------------------------------- SeMi (docs/long_tailed.md)

def logit_adjustment(prior: torch.Tensor, tau: float) -> torch.Tensor:
    """log(pi_k^tau + 1e-12): the additive logit adjustment of SeMi's balanced head (ACR's logit
    align; Menon et al. 2021). The 1e-12 keeps a class without labels finite. float32 (K,)."""
    if prior.dim() != 1 or not prior.dtype.is_floating_point:
        raise ValueError(f"prior must be a 1-D floating-point tensor (K,), got shape "
                         f"{tuple(prior.shape)} and dtype {prior.dtype}")
    return torch.log(_f32(prior) ** tau + 1e-12).float()


def bank_class_probs(features: torch.Tensor, centres: torch.Tensor,
                     temperature: float = 0.1) -> torch.Tensor:
    """SeMi's semantic pseudo-label q^proto_bc = softmax_c(-||f_b - mu_c||_2 / tau_tar), mu_c the
    mean of class c's memory-bank slots. Features are not normalised (as SeMi). float32 (U, K)."""
    if features.dim() != 2 or centres.dim() != 2 or features.shape[1] != centres.shape[1]:
        raise ValueError(f"features (U, D) and centres (K, D) must be 2-D with the same D, got "
                         f"{tuple(features.shape)} and {tuple(centres.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with _no_autocast(features):
        d = torch.cdist(_f32(features), _f32(centres), compute_mode="donot_use_mm_for_euclid_dist")
        return torch.softmax(-d / temperature, dim=1)


def semantic_blend(probs: torch.Tensor, proto_probs: torch.Tensor,
                   share: torch.Tensor, alpha: float, ramp: float) -> torch.Tensor:
    """SeMi's pseudo-label with semantic pseudo-labels (PLCE): p'_bc = (1 - a_c) p_bc +
    a_c q^proto_bc, a_c = alpha * ramp * share_c (share = pi_hat, the running class share of
    the masked pseudo-labels). Not renormalised: SeMi's code takes max / argmax / entropy of p'
    as it is (rows sum to 1 only when a_c is the same for every class). float32 (U, K)."""
    _check_2d("probs", probs)
    if proto_probs.shape != probs.shape or share.shape != probs.shape[1:]:
        raise ValueError(f"proto_probs must have the shape of probs {tuple(probs.shape)} and share "
                         f"({probs.shape[1]},), got {tuple(proto_probs.shape)} and {tuple(share.shape)}")
    a = alpha * ramp * _f32(share)
    return ((1 - a) * _f32(probs) + a * _f32(proto_probs)).float()


def feature_consistency(f_w: torch.Tensor, f_s: torch.Tensor, center: torch.Tensor,
                        temperature: float = 0.09, sharpen: float = 5.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """SeMi's certainty enhancement on features (DINO-style): target q_b = softmax_d((f^w_b - c) /
    (tau_p / sharpen)) over the feature dimensions, student log softmax_d(f^s_b / tau_p);
    returns the per-sample soft cross-entropy -sum_d q_bd log softmax(f^s_b / tau_p)_d (float32
    (U,), gradient into f_s only) and q (for the centre update)."""
    if f_w.dim() != 2 or f_s.shape != f_w.shape or center.shape != f_w.shape[1:]:
        raise ValueError(f"f_w and f_s must be (U, D) and center (D,), got {tuple(f_w.shape)}, "
                         f"{tuple(f_s.shape)} and {tuple(center.shape)}")
    if not temperature > 0 or not sharpen > 0:
        raise ValueError(f"temperature and sharpen must be > 0, got {temperature} and {sharpen}")
    with _no_autocast(f_w):
        q = torch.softmax((_f32(f_w).detach() - _f32(center)) / (temperature / sharpen), dim=1)
        return -(q * torch.log_softmax(_f32(f_s) / temperature, dim=1)).sum(1), q
