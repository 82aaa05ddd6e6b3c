"""One training step per method: from the forward pass of one batch to (loss, diagnostics).

    contrastive_step   --loss base | entropy   [G] Eqs. (4)-(7) / [N&O] Eqs. (8)-(14)   (docs/method.md)
    fixmatch_step      --loss fixmatch         Sohn et al. 2020                          (docs/peers.md)
    ccssl_step         --loss ccssl            Yang et al. 2022: FixMatch + class-aware contrast
    simmatch_step      --loss simmatch         Zheng et al. 2022, as USB runs it on CIFAR
    semi_step          --loss semi             Wang et al. 2025 (SeMi), long-tailed     (docs/long_tailed.md)

The batch is one forward pass over [x weak; u weak; u strong 1 (; u strong 2)] (BN statistics over
the concatenation); `Out` holds its projections z (L2-normalised) and classifier logits. All the
maths is in losses.py; this file only wires the views to it. The teacher of every method is the
online model's weak view, without gradient. Nothing here reads a tensor back to the host.

Each step returns the loss, a float64 vector of DIAG per-step counts and a (3, K, K) pseudo-label
confusion, summed over an evaluation interval by train.py for metrics.jsonl: how many unlabeled
samples were confident (mask = 1), entropy-selected or unconfident, how many of the first two
groups had the right pseudo-label, the summed unlabeled weight, (SimMatch) how many argmax of
p_hat / p_w were right; and, per group (confident, entropy-selected, unconfident), the counts of
(true class, argmax class) pairs, from which the per-class statistics follow.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import losses

STRONG_VIEWS = {"base": 2, "entropy": 2, "fixmatch": 1, "ccssl": 2, "simmatch": 1, "semi": 2}
PEERS = ("fixmatch", "ccssl", "simmatch")
CLASSIFIER = PEERS + ("semi",)  # methods that predict with a linear classifier
BALANCED_HEAD = ("semi",)  # a second, logit-adjusted classifier that predicts (model.Encoder)
# train.py's method-specific flags: (default, the methods they apply to). Given for another
# method, a flag is an error; not given, it takes the default for its methods and None elsewhere.
CONTRASTIVE = ("base", "entropy")
FLAGS = {
    "pl_temp": (0.08, CONTRASTIVE), "temp": (0.1, CONTRASTIVE), "low_weight": (0.2, CONTRASTIVE),
    "pair_weight": ("geometric", ("entropy",)),
    "lambda_u": (1.0, PEERS), "lambda_c": (1.0, ("ccssl",)), "ccssl_temp": (0.07, ("ccssl",)),
    "lambda_in": (1.0, ("simmatch",)), "bank_momentum": (0.7, ("simmatch",)),
    "bank_temp": (0.1, ("simmatch",)), "smoothing_alpha": (0.9, ("simmatch",)),
    "da_len": (32, ("simmatch",)),
    "hard_weight": (0.0, PEERS),
    # SeMi (docs/long_tailed.md): values of the authors' README where it gives them, else their code's
    "oheml_scale": (0.75, ("semi",)), "lambda_cons": (0.15, ("semi",)),
    "cons_temp": (0.09, ("semi",)), "semi_bank_size": (128, ("semi",)),
    "semi_decay": (0.99, ("semi",)), "semi_decay_step": (None, ("semi",)),  # 100; 200 for cifar100
    "semi_proto_temp": (0.1, ("semi",)), "semi_alpha": (0.4, ("semi",)),
    "semi_ramp_epochs": (None, ("semi",)),  # --epochs
    "semi_start_epoch": (6, ("semi",)), "la_tau_x": (2.0, ("semi",)), "la_tau_u": (2.0, ("semi",)),
    "semi_feature": ("pooled", ("semi",)),
}
SEMI_FLAGS = tuple(k for k, (_, owners) in FLAGS.items() if owners == ("semi",))
DIAG = ("n_ulb", "confident", "entropy_selected", "unconfident", "correct_confident",
        "correct_selected", "weight_sum", "correct_p_hat", "correct_p_w")


@dataclass
class Out:
    """The forward pass of one step, split into its views (float32)."""
    z_lb: torch.Tensor                   # (B, D) projections of the labeled weak view
    z_w: torch.Tensor | None             # (U, D) unlabeled weak view (None when --mu 0)
    z_s: list                            # projections of the strong views, (U, D) each
    logits_lb: torch.Tensor | None       # (B, K) classifier logits (peers only; semi: see heads)
    logits_w: torch.Tensor | None
    logits_s: list
    y_lb: torch.Tensor                   # (B,) labels
    pos_lb: torch.Tensor                 # (B,) positions of the labeled images in the labeled set
    y_ulb: torch.Tensor | None           # (U,) true labels: diagnostics only, never the loss


def split_views(z: torch.Tensor, logits: torch.Tensor | None, n_lb: int, n_ulb: int, n_strong: int,
                y_lb, pos_lb, y_ulb) -> Out:
    def parts(t):
        if t is None:
            return None, None, []
        if not n_ulb:
            return t, None, []
        rest = t[n_lb:].split(n_ulb)
        return t[:n_lb], rest[0], list(rest[1:1 + n_strong])
    z_lb, z_w, z_s = parts(z)
    l_lb, l_w, l_s = parts(logits)
    return Out(z_lb, z_w, z_s, l_lb, l_w, l_s, y_lb, pos_lb, y_ulb)


def diagnostics(o: Out, k: int, pred: torch.Tensor, confident: torch.Tensor,
                selected: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                p_hat: torch.Tensor | None = None, p_w: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The DIAG counts of one step as a float64 device vector, and the (3, K, K) confusion of
    (true, argmax) class of the confident, entropy-selected and unconfident samples (no host
    sync). `pred` is the argmax class, which is the pseudo-label of the first two groups."""
    n = torch.full((), float(len(pred)), device=pred.device, dtype=torch.float64)
    selected = torch.zeros_like(confident) if selected is None else selected
    right = pred == o.y_ulb
    weight = confident.double() if weight is None else weight
    zero = torch.zeros((), device=pred.device, dtype=torch.float64)
    ok_hat = zero if p_hat is None else (p_hat.argmax(1) == o.y_ulb).sum().double()
    ok_w = zero if p_w is None else (p_w.argmax(1) == o.y_ulb).sum().double()
    counts = [confident, selected, ~confident & ~selected, confident & right, selected & right]
    counts = torch.stack([n] + [c.sum().double() for c in counts]
                         + [weight.sum().double(), ok_hat, ok_w])
    group = torch.where(confident, 0, torch.where(selected, 1, 2))
    return counts, pl_confusion(o.y_ulb, pred, group, k)


def pl_confusion(y_true: torch.Tensor, pred: torch.Tensor, group: torch.Tensor,
                 k: int) -> torch.Tensor:
    """(3, K, K) float64 counts of (group, true class, predicted class), by one index_add
    (bincount would read its output size back to the host on a GPU). Images without a label
    (true class -1: x_unlabeled) are not counted."""
    known = y_true >= 0
    flat = (group * k + y_true.clamp(min=0)) * k + pred
    out = torch.zeros(3 * k * k, device=pred.device, dtype=torch.float64)
    return out.index_add_(0, flat, known.double()).view(3, k, k)


def no_unlabeled(device, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(len(DIAG), device=device, dtype=torch.float64),
            torch.zeros(3, k, k, device=device, dtype=torch.float64))


# ---------------------------------------------------------------- [G] and [N&O] (Table 1)

def contrastive_step(o: Out, model, a, step: int = 0, state=None):
    """[G] (--loss base): Eqs. (4)-(7); [N&O] (--loss entropy): Eqs. (4), (5), (8)-(14).

    Rows [prototypes (labels 0..K-1); z^x (true labels); z^1; z^2 (pseudo-labels, shared)].
    Entropy selection and weighting (Eqs. 10-14) are on for the first --entropy-epochs epochs;
    afterwards labels and weights follow Eqs. (5), (7) while the loss stays Eq. (8)."""
    entropy_on = a.loss == "entropy" and step < a.entropy_epochs * a.steps_per_epoch
    protos = model.prototypes
    k = protos.shape[0]
    if o.z_w is None:  # --mu 0: prototypes and labeled rows only
        feats, labels, weights = losses.contrastive_batch(protos, o.z_lb, o.y_lb)
        diag = no_unlabeled(protos.device, k)
    else:
        with torch.no_grad():  # Eq. (4): targets from the online model's weak view
            q = losses.prototype_probs(o.z_w.detach(), protos.detach(), a.pl_temp)
            pl, pw = losses.assign_pseudo_labels(q, a.threshold,
                                                 a.entropy_ratio if entropy_on else None,
                                                 a.low_weight, a.entropy_weighting, validate=False)
        feats, labels, weights = losses.contrastive_batch(protos, o.z_lb, o.y_lb, o.z_s[0],
                                                          o.z_s[1], pl, pw)
        conf, pred = q.max(1)
        confident = conf >= a.threshold
        diag = diagnostics(o, k, pred, confident, (pl < k) & ~confident, pw)
    if a.loss == "base":  # [G] Eq. (6): anchor-weighted
        loss = losses.anchor_weighted_supcon(feats, labels, weights, a.temp, validate=False)
    else:  # [N&O] Eq. (8): pair-weighted
        loss = losses.pair_weighted_supcon(feats, labels, weights, a.temp, validate=False,
                                           pair=a.pair_weight)
    return loss, *diag


# ---------------------------------------------------------------- peers (docs/peers.md)

def weak_teacher(o: Out) -> torch.Tensor:
    """p_b = softmax(logits(alpha(u_b))) of the online model, temperature 1, no gradient."""
    return torch.softmax(o.logits_w.detach().float(), dim=1)


def supervised_ce(o: Out) -> torch.Tensor:
    return F.cross_entropy(o.logits_lb.float(), o.y_lb)


HARD_WEIGHT_EPOCH = 5  # SeMi's entropy hard-example weighting starts after 5 epochs


def hard_weight(target: torch.Tensor, a, epoch: int) -> torch.Tensor | float:
    """SeMi's OHEML weight of each unlabeled loss term (docs/long_tailed.md), from the teacher's target
    distribution; 1 without --hard-weight or during the first epochs."""
    if not a.hard_weight or epoch < HARD_WEIGHT_EPOCH:
        return 1.0
    return losses.oheml_weight(target, a.hard_weight, validate=False)


def fixmatch_step(o: Out, model, a, step: int = 0, state=None):
    """L = CE(logits(x), y) + lambda_u (1/muB) sum_b m_b CE(logits(A1(u_b)), yhat_b)."""
    if o.z_w is None:
        return supervised_ce(o), *no_unlabeled(o.y_lb.device, o.logits_lb.shape[1])
    p = weak_teacher(o)
    mask, pl = losses.fixmatch_mask(p, a.threshold, validate=False)
    w = mask * hard_weight(p, a, step // a.steps_per_epoch)
    l_u = losses.masked_cross_entropy(o.logits_s[0].float(), pl, w)
    return supervised_ce(o) + a.lambda_u * l_u, *diagnostics(o, p.shape[1], pl, mask > 0, weight=w)


def ccssl_step(o: Out, model, a, step: int = 0, state=None):
    """FixMatch on strong view 1, plus lambda_c times the class-aware contrastive loss over the
    projections [z^1; z^2] of all unlabeled samples, targets weighted by c_i c_j (docs/peers.md)."""
    if o.z_w is None:
        return supervised_ce(o), *no_unlabeled(o.y_lb.device, o.logits_lb.shape[1])
    p = weak_teacher(o)
    mask, pl = losses.fixmatch_mask(p, a.threshold, validate=False)
    conf = p.max(1).values
    w = mask * hard_weight(p, a, step // a.steps_per_epoch)
    l_u = losses.masked_cross_entropy(o.logits_s[0].float(), pl, w)
    l_c = losses.ccssl_supcon(torch.cat(o.z_s[:2]), pl, conf, a.ccssl_temp, validate=False)
    return (supervised_ce(o) + a.lambda_u * l_u + a.lambda_c * l_c,
            *diagnostics(o, p.shape[1], pl, mask > 0, weight=w))


class SimMatchState:
    """SimMatch's state that outlives a step: the labeled memory bank (one L2-normalised
    embedding and label per labeled image) and the FIFO queue of batch-mean teacher
    probabilities for distribution alignment. Saved in the checkpoint."""

    def __init__(self, y_labeled: torch.Tensor, num_classes: int, dim: int, da_len: int,
                 generator: torch.Generator):
        dev = y_labeled.device
        self.bank = F.normalize(torch.randn(len(y_labeled), dim, generator=generator, device=dev), dim=1)
        self.labels = y_labeled.long().clone()
        self.queue = torch.zeros(da_len, num_classes, device=dev)
        self.filled = torch.zeros((), dtype=torch.long, device=dev)  # pushes so far (device: no sync)

    @torch.no_grad()
    def align(self, p_w: torch.Tensor) -> torch.Tensor:
        """Distribution alignment: push the batch mean, then p_w (1/K) / mean(queue), renormalised."""
        slot = self.filled % len(self.queue)
        self.queue.index_copy_(0, slot.view(1), p_w.mean(0, keepdim=True))
        self.filled += 1
        n = self.filled.clamp(max=len(self.queue))
        rows = torch.arange(len(self.queue), device=p_w.device) < n  # the filled slots
        mean = (self.queue * rows[:, None]).sum(0) / n
        return losses.distribution_alignment(p_w, mean)

    @torch.no_grad()
    def update(self, pos: torch.Tensor, z: torch.Tensor, momentum: float) -> None:
        """bank[i] <- normalize(m bank[i] + (1 - m) z_i) for the labeled batch; an image drawn
        several times in the batch uses the mean of its embeddings (deterministic)."""
        total = torch.zeros_like(self.bank).index_add_(0, pos, z.float())
        count = torch.zeros(len(self.bank), device=z.device).index_add_(
            0, pos, torch.ones(len(pos), device=z.device))
        hit = count > 0
        mean = total / count.clamp(min=1)[:, None]
        new = F.normalize(momentum * self.bank + (1 - momentum) * mean, dim=1)
        self.bank = torch.where(hit[:, None], new, self.bank)

    def state_dict(self) -> dict:
        # copies: .cpu() of a CPU tensor is the tensor itself, and align() updates in place
        return {k: getattr(self, k).detach().cpu().clone()
                for k in ("bank", "labels", "queue", "filled")}

    def load_state_dict(self, s: dict) -> None:
        dev = self.bank.device
        self.bank, self.labels = s["bank"].to(dev), s["labels"].to(dev)
        self.queue, self.filled = s["queue"].to(dev), s["filled"].to(dev)


def simmatch_step(o: Out, model, a, step: int = 0, state: SimMatchState = None):
    """Lx + lambda_u Lu + lambda_in L_in with labeled-bank label propagation (docs/peers.md).

    The bank is read before the step's loss and updated with the labeled batch afterwards."""
    if o.z_w is None:
        state.update(o.pos_lb, o.z_lb.detach(), a.bank_momentum)
        return supervised_ce(o), *no_unlabeled(o.y_lb.device, o.logits_lb.shape[1])
    epoch = step // a.steps_per_epoch
    bank = state.bank.clone()  # the state is updated in place below; the loss keeps this copy
    with torch.no_grad():
        p_w = state.align(weak_teacher(o))
        p_hat, q_hat = losses.simmatch_targets(p_w, o.z_w.detach() @ bank.T / a.bank_temp,
                                               state.labels, a.smoothing_alpha, validate=False)
    if epoch == 0:  # SimMatch's warm-up: no propagation through the bank in the first epoch
        p_hat = p_w
    conf, pl = p_hat.max(1)
    mask = (conf >= a.threshold).float()
    w = mask * hard_weight(p_hat, a, epoch)
    l_u = (losses.soft_cross_entropy(o.logits_s[0].float(), p_hat) * w).mean()
    l_in = losses.soft_cross_entropy(o.z_s[0] @ bank.T / a.bank_temp, q_hat).mean()
    if epoch == 0:
        l_in = l_in * 0.0
    state.update(o.pos_lb, o.z_lb.detach(), a.bank_momentum)
    loss = supervised_ce(o) + a.lambda_u * l_u + a.lambda_in * l_in
    return loss, *diagnostics(o, p_hat.shape[1], pl, mask > 0, weight=w, p_hat=p_hat, p_w=p_w)


# ---------------------------------------------------------------- SeMi (docs/long_tailed.md)

HIST_BINS = 20  # OHEML weight histogram over [0, 1] (metrics.jsonl: oheml_hist_*)
CENTER_MOMENTUM = 0.9  # the feature-consistency centre c <- 0.9 c + 0.1 mean(q), SeMi's constant


class SemiState:
    """SeMi's state that outlives a step, saved in the checkpoint:

    - the balanced memory bank: K x M feature slots with a K x M confidence table, each class row
      sorted by confidence (highest first), starting at zero features and confidence 0, and
      which slots were filled since the last decay (`fresh`);
    - the running counts of masked pseudo-labels per class and their share pi_hat, refreshed at
      the end of every epoch (1 for every class until the first refresh, as in SeMi's code);
    - the centre of the feature-consistency target;
    - the OHEML weight histograms since the last evaluation (diagnostics only).
    The labeled prior and its logit adjustments are derived from the split, not saved."""

    KEYS = ("bank", "conf", "fresh", "counts", "share", "center", "hist")

    def __init__(self, y_labeled: torch.Tensor, num_classes: int, dim: int, slots: int,
                 tau_x: float, tau_u: float):
        dev = y_labeled.device
        k = num_classes
        self.bank = torch.zeros(k, slots, dim, device=dev)
        self.conf = torch.zeros(k, slots, device=dev)
        self.fresh = torch.zeros(k, slots, dtype=torch.bool, device=dev)
        self.counts = torch.zeros(k, dtype=torch.float64, device=dev)
        self.share = torch.ones(k, device=dev)
        self.center = torch.zeros(dim, device=dev)
        self.hist = torch.zeros(2, HIST_BINS, dtype=torch.float64, device=dev)  # masked, all
        n = torch.zeros(k, dtype=torch.float64, device=dev).index_add_(
            0, y_labeled.long(), torch.ones(len(y_labeled), dtype=torch.float64, device=dev))
        self.prior = (n / n.sum().clamp(min=1)).float()  # pi_l, the labeled class prior
        self.adj_x = losses.logit_adjustment(self.prior, tau_x)  # head 2's labeled CE
        self.adj_u = losses.logit_adjustment(self.prior, tau_u)  # head 2's unlabeled teacher

    def centres(self) -> torch.Tensor:
        """mu_c: the mean of class c's M slots (empty slots count as zero vectors, as in SeMi)."""
        return self.bank.mean(1)

    @torch.no_grad()
    def push(self, feats: torch.Tensor, labels: torch.Tensor, conf: torch.Tensor,
             mask: torch.Tensor) -> None:
        """Insert the masked candidates into their pseudo-label's row. Sequentially (SeMi's loop),
        a candidate replaces the row's lowest-confidence slot if its confidence is strictly
        higher, and the row is re-sorted; that is, each row keeps the M best of [its slots;
        the candidates in batch order] by confidence, ties going to the earlier entry. Here in
        one stable sort per row."""
        k, m, d = self.bank.shape
        mine = mask[None, :] & (labels[None, :] == torch.arange(k, device=labels.device)[:, None])
        cand = torch.where(mine, conf.float()[None, :], torch.full_like(mine, -math.inf, dtype=torch.float32))
        val, idx = torch.cat([self.conf, cand], 1).sort(dim=1, descending=True, stable=True)
        val, idx = val[:, :m], idx[:, :m]
        old = idx < m
        slot = idx.clamp(max=m - 1)
        kept = self.bank.gather(1, slot[..., None].expand(-1, -1, d))
        self.bank = torch.where(old[..., None], kept, feats.float()[(idx - m).clamp(min=0)])
        self.fresh = torch.where(old, self.fresh.gather(1, slot), True)
        self.conf = val

    @torch.no_grad()
    def decay(self, factor: float) -> None:
        """Every confidence not inserted since the last decay times `factor`; rows re-sorted."""
        self.conf = torch.where(self.fresh, self.conf, self.conf * factor)
        self.fresh = torch.zeros_like(self.fresh)
        self.conf, idx = self.conf.sort(dim=1, descending=True, stable=True)
        self.bank = self.bank.gather(1, idx[..., None].expand(-1, -1, self.bank.shape[2]))

    @torch.no_grad()
    def count(self, labels: torch.Tensor, mask: torch.Tensor, refresh: bool) -> None:
        """Add the masked pseudo-labels to the per-class counts; at the end of an epoch, pi_hat =
        counts / total (kept as it was while nothing has been masked: SeMi's code would divide
        0 by 0)."""
        self.counts.index_add_(0, labels, mask.double())
        if refresh:
            total = self.counts.sum()
            self.share = torch.where(total > 0, self.counts / total.clamp(min=1), self.share).float()

    @torch.no_grad()
    def record(self, w: torch.Tensor, mask: torch.Tensor) -> None:
        """OHEML weights into HIST_BINS bins over [0, 1]: of the masked samples, and of all."""
        b = (w.float() * HIST_BINS).long().clamp(0, HIST_BINS - 1)
        self.hist[0].index_add_(0, b, mask.double())
        self.hist[1].index_add_(0, b, torch.ones_like(w, dtype=torch.float64))

    def metrics(self) -> dict:
        """The histograms since the last call (metrics.jsonl), then reset (host sync: eval time)."""
        masked, every = self.hist.round().long().tolist()
        self.hist = torch.zeros_like(self.hist)
        return {"oheml_hist_masked": masked, "oheml_hist_all": every}

    def state_dict(self) -> dict:
        return {k: getattr(self, k).detach().cpu().clone() for k in self.KEYS}

    def load_state_dict(self, s: dict) -> None:
        dev = self.bank.device
        for k in self.KEYS:
            setattr(self, k, s[k].to(dev))


def heads(t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The balanced-head model's outputs [head 1 logits | head 2 logits | pooled feature]."""
    return t[:, :k], t[:, k:2 * k], t[:, 2 * k:]


@torch.no_grad()
def semi_targets(l1_w: torch.Tensor, l2_w: torch.Tensor, f_s1: torch.Tensor, a, state: SemiState,
                 epoch: int, on: bool) -> tuple[torch.Tensor, ...]:
    """The targets of both heads from the weak view's logits (no gradient): head 1's pseudo-label,
    confidence, mask and OHEML weight (teacher p, from the start epoch blended into p' with the
    bank's semantic pseudo-labels of the first strong view's feature); head 2's pseudo-label and
    mask from head 1's logit-adjusted weak logits."""
    p_raw = torch.softmax(l1_w, dim=1)
    p = p_raw
    if on:
        q_proto = losses.bank_class_probs(f_s1, state.centres(), a.semi_proto_temp)
        ramp = min(epoch / a.semi_ramp_epochs, 1.0)
        p = losses.semantic_blend(p_raw, q_proto, state.share, a.semi_alpha, ramp)
    conf, pl = p.max(1)
    mask = (conf >= a.threshold) | (p_raw.max(1).values >= a.threshold)
    w = losses.oheml_weight(p, a.oheml_scale, validate=False) if on else torch.ones_like(conf)
    conf_b, pl_b = torch.softmax(l1_w - state.adj_u, dim=1).max(1)
    mask_b = (conf_b >= a.threshold) | (torch.softmax(l2_w, dim=1).max(1).values >= a.threshold)
    return pl, conf, mask, w, pl_b, mask_b


def semi_step(o: Out, model, a, step: int = 0, state: SemiState = None):
    """SeMi: L = Lx + Lu + Lx^b + Lu^b + lambda_cons L_cons (docs/long_tailed.md).

    Head 1 (FixMatch on both strong views): teacher p = softmax(z_w), from epoch
    --semi-start-epoch on blended with the bank's semantic pseudo-labels (p') and its terms
    weighted by OHEML; mask [max p' >= t] or [max p >= t]. Head 2 (balanced): Lx^b =
    CE(z^b_x + log pi^tau_x, y), Lu^b = CE(z^b_s, argmax softmax(z_w - log pi^tau_u)) on the
    mask [max softmax(z_w - log pi^tau_u) >= t] or [max softmax(z^b_w) >= t]. L_cons: the
    sharpened, centred feature target of the weak view for the strong views of the samples the
    mask rejects. The bank is read (class centres) before this step's push."""
    k = model.classifier.out_features
    l1_lb, l2_lb, _ = heads(o.logits_lb, k)
    loss_x = F.cross_entropy(l1_lb, o.y_lb) + F.cross_entropy(l2_lb + state.adj_x, o.y_lb)
    if o.z_w is None:
        return loss_x, *no_unlabeled(o.y_lb.device, k)
    epoch = step // a.steps_per_epoch
    on = epoch >= a.semi_start_epoch  # OHEML, semantic pseudo-labels and L_cons
    l1_w, l2_w, f_w = heads(o.logits_w, k)
    s1, s2 = heads(o.logits_s[0], k), heads(o.logits_s[1], k)
    f_s = [s1[2], s2[2]] if a.semi_feature == "pooled" else o.z_s[:2]
    f_w = f_w if a.semi_feature == "pooled" else o.z_w
    pl, conf, mask, w, pl_b, mask_b = semi_targets(l1_w.detach(), l2_w.detach(), f_s[0].detach(),
                                                   a, state, epoch, on)
    two = lambda t: torch.cat([t, t])  # noqa: E731 - the same target for both strong views
    l_u = losses.masked_cross_entropy(torch.cat([s1[0], s2[0]]), two(pl), two(mask * w))
    l_ub = losses.masked_cross_entropy(torch.cat([s1[1], s2[1]]), two(pl_b), two(mask_b.float()))
    loss = loss_x + l_u + l_ub
    if on:
        cons, q = losses.feature_consistency(two(f_w), torch.cat(f_s), state.center, a.cons_temp)
        loss = loss + a.lambda_cons * (cons * two((~mask).float())).mean()
        state.center = CENTER_MOMENTUM * state.center + (1 - CENTER_MOMENTUM) * q.mean(0)
        state.record(w, mask)
    # the state after the loss has read it: pi_hat counts, bank push, decay
    state.count(pl, mask, refresh=(step + 1) % a.steps_per_epoch == 0)
    state.push(torch.cat(f_s).detach(), two(pl), two(conf), two(mask))
    if (step + 1) % a.semi_decay_step == 0:
        state.decay(a.semi_decay)
    return loss, *diagnostics(o, k, pl, mask, weight=mask * w)


STEPS = {"base": contrastive_step, "entropy": contrastive_step, "fixmatch": fixmatch_step,
         "ccssl": ccssl_step, "simmatch": simmatch_step, "semi": semi_step}


def make_state(loss: str, y_lb: torch.Tensor, num_classes: int, da_len: int | None,
               generator: torch.Generator, a=None, feat_dim: int = 128):
    """The state a method keeps between steps (saved in the checkpoint): SimMatch's bank and
    queue, SeMi's memory bank and statistics (`feat_dim`: the pooled backbone feature's size);
    None for the other methods."""
    if loss == "semi":
        dim = 128 if a.semi_feature == "projection" else feat_dim
        return SemiState(y_lb, num_classes, dim, a.semi_bank_size, a.la_tau_x, a.la_tau_u)
    if loss != "simmatch":
        return None
    return SimMatchState(y_lb, num_classes, 128, da_len, generator)
