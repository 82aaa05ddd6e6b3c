"""Roda & Geva's semi-supervised active learning: a convolutional auto-encoder whose latent space
is clustered by a DEC clustering layer, sharpened by their cluster contrastive loss on the
labeled images, and queried by the entropy of the cluster assignment (docs/active_learning.md).

One run = one dataset, one seed, one query strategy:

    pre-training  50 epochs of L_rec (MSE) over the pool
    round r = 0..R  centroids (round 0 only) = labeled class means; 10 epochs of
                    a_rec L_rec + a_clu KL(P||Q) + a_ccl L_ccl, P refreshed every 80 iterations
                    over the pool; accuracy of argmax q on the validation split and the test set;
                    then query --query-size pool images (entropy / random / core-set)

    python cae_al.py --dataset fashionmnist --data-dir DIR --out runs/fm-entropy-s0
    python cae_al.py --report runs          # table (md + csv) and plot of every run under runs/

A checkpoint (last.pt, atomic) is written after every pre-training epoch and every round; the
same command resumes where it stopped, and a finished run is skipped.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import losses
import model
from checkpoint import atomic_write, write_text

PROG = "cae_al.py"
QUERIES = ("entropy", "random", "coreset")
# accuracy at 1 / 3 / 5 / 10 % of the pool labeled, published in Roda & Geva's Table 4
# (Fashion-MNIST). Tables 3 (MNIST) and 5 (USPS) are not transcribed here.
PERCENTS = (1, 3, 5, 10)
PAPER = {"fashionmnist": {"Ours (entropy + CCL)": (0.490, 0.671, 0.697, 0.758),
                          "Entropy": (0.318, 0.468, 0.556, 0.637),
                          "Core-set": (0.305, 0.627, 0.679, 0.729)}}
PAPER_POOL = {"mnist": 48000, "fashionmnist": 48000, "usps": 7438}  # their pools (80 % split)
# what must match for a checkpoint to be resumed (--rounds may grow, --threads may change)
RESUME_KEYS = ("dataset", "seed", "query", "no_ccl", "ccl_form", "tau", "alpha_rec", "alpha_clu",
               "alpha_ccl", "val_frac", "init_labels", "query_size", "epochs_per_round",
               "pretrain_epochs", "batch_size", "batch_lb", "lr", "update_interval", "subset")
# what pre-training depends on: a run may start from another run's pretrained.pt if these match
PRETRAIN_KEYS = ("dataset", "seed", "val_frac", "init_labels", "pretrain_epochs", "batch_size",
                 "lr", "subset")


def fail(msg: str) -> None:
    sys.exit(f"{PROG}: error: {msg}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--dataset", default="fashionmnist", choices=sorted(data.MNIST_FAMILY))
    g.add_argument("--data-dir", default="data", help="folder with the IDX / USPS files "
                   "(downloaded there by torchvision when missing)")
    g.add_argument("--out", help="run directory (checkpoint, history, latents)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--subset", type=int, default=0, help="use only the first N training images "
                   "(quick checks; 0 = all)")
    g.add_argument("--pretrained", metavar="DIR", help="start from the pretrained.pt of another "
                   "run with the same data, seed and pre-training settings (skips pre-training; "
                   "the result is identical)")
    g = p.add_argument_group("protocol (Roda & Geva)")
    g.add_argument("--query", default="entropy", choices=QUERIES)
    g.add_argument("--val-frac", type=float, default=0.2, help="validation share of the training set")
    g.add_argument("--init-labels", type=int, default=None,
                   help="initial random labels (default 250; USPS 75 = 1%% of its pool)")
    g.add_argument("--query-size", type=int, default=None,
                   help="labels added per round (default 250; USPS 75)")
    g.add_argument("--rounds", type=int, default=None, help="query rounds (default 20; USPS 9)")
    g.add_argument("--pretrain-epochs", type=int, default=50)
    g.add_argument("--epochs-per-round", type=int, default=10)
    g.add_argument("--update-interval", type=int, default=80,
                   help="iterations between refreshes of the target distribution P")
    g = p.add_argument_group("losses (weights and tau are not given in the paper)")
    g.add_argument("--no-ccl", action="store_true", help="clustering alone (their Table 2 ablation)")
    g.add_argument("--ccl-form", default="printed", choices=("printed", "infonce"),
                   help="Eq. 7 as printed (positive not in the denominator) or InfoNCE")
    g.add_argument("--tau", type=float, default=1.0, help="CCL temperature")
    g.add_argument("--alpha-rec", type=float, default=1.0)
    g.add_argument("--alpha-clu", type=float, default=0.1)
    g.add_argument("--alpha-ccl", type=float, default=0.1)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256, help="pool images per iteration")
    g.add_argument("--batch-lb", type=int, default=64, help="labeled images per iteration (CCL)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam")
    g = p.add_argument_group("outputs")
    g.add_argument("--report", metavar="ROOT", help="only write the table / CSV / plot of the runs "
                   "under ROOT (no training)")
    g.add_argument("--tsne", action="store_true", help="t-SNE picture of the final latents "
                   "(needs scikit-learn)")
    a = p.parse_args(argv)
    usps = a.dataset == "usps"
    a.init_labels = a.init_labels if a.init_labels is not None else (75 if usps else 250)
    a.query_size = a.query_size if a.query_size is not None else (75 if usps else 250)
    a.rounds = a.rounds if a.rounds is not None else (9 if usps else 20)
    if a.report is None and not a.out:
        p.error("--out is required (or --report ROOT)")
    for k in ("init_labels", "query_size", "pretrain_epochs", "epochs_per_round", "update_interval",
              "batch_size", "batch_lb"):
        if getattr(a, k) < (0 if k in ("pretrain_epochs", "epochs_per_round") else 1):
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    if a.rounds < 0 or not 0 < a.val_frac < 1 or not a.tau > 0 or a.lr <= 0 or a.subset < 0:
        p.error("need --rounds >= 0, 0 < --val-frac < 1, --tau > 0, --lr > 0, --subset >= 0")
    return a


# ---------------------------------------------------------------- data and split

def split_pool(n: int, val_frac: float, init_labels: int, seed: int):
    """Seeded 80/20 split of the training set into pool / validation (sorted dataset indices)
    and the initial labeled pool: init_labels random pool positions (sorted)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = int(round(val_frac * n))
    val, pool = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if init_labels > len(pool):
        raise ValueError(f"--init-labels {init_labels} is larger than the pool ({len(pool)} images)")
    labeled = np.sort(rng.choice(len(pool), init_labels, replace=False))
    return pool, val, labeled


def load(a) -> dict:
    d = data.load_mnist_family(a.dataset, a.data_dir)
    if a.dataset == "usps":  # their USPS pool of 7,438 = 80 % of train + test (9,298)
        d["x_train"] = np.concatenate([d["x_train"], d["x_test"]])
        d["y_train"] = np.concatenate([d["y_train"], d["y_test"]])
        d["x_test"], d["y_test"] = d["x_test"][:0], d["y_test"][:0]
    if a.subset:
        d["x_train"], d["y_train"] = d["x_train"][:a.subset], d["y_train"][:a.subset]
    if d["x_train"].ndim != 3 or d["x_train"].shape[1] != d["x_train"].shape[2]:
        raise ValueError(f"expected square single-channel images (N, H, W), got "
                         f"{d['x_train'].shape}")
    return d


def images(x: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) uint8 tensor; scaled to [0, 1] per batch (see `batch`)."""
    return torch.from_numpy(np.ascontiguousarray(x))[:, None]


def batch(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float().div_(255)


# ---------------------------------------------------------------- the run

class Run:
    """Everything a round needs; `state()` is what the checkpoint keeps."""

    def __init__(self, a, d: dict):
        self.a = a
        self.pool, self.val, labeled = split_pool(len(d["x_train"]), a.val_frac, a.init_labels,
                                                  a.seed)
        self.x_pool, self.y_pool = images(d["x_train"][self.pool]), torch.from_numpy(d["y_train"][self.pool])
        self.x_val, self.y_val = images(d["x_train"][self.val]), torch.from_numpy(d["y_train"][self.val])
        self.x_test, self.y_test = images(d["x_test"]), torch.from_numpy(d["y_test"])
        self.k, self.data_id = d["num_classes"], data.fingerprint(d)
        # what pre-training sees: the pool's images (not their labels, not validation or test)
        self.pool_id = data.fingerprint({"x_pool": d["x_train"][self.pool]}, ("pool",))["digest"]
        torch.manual_seed(a.seed)
        # channels-last: oneDNN's convolutions are faster on it here (docs/speed.md)
        self.cae = model.CAE(size=d["x_train"].shape[1]).to(memory_format=torch.channels_last)
        self.clu = model.ClusteringLayer(self.k, self.cae.latent)
        self.opt_pre = torch.optim.Adam(self.cae.parameters(), lr=a.lr)
        self.opt = torch.optim.Adam([*self.cae.parameters(), *self.clu.parameters()], lr=a.lr)
        self.g = torch.Generator().manual_seed(a.seed)
        self.labeled = labeled                       # pool positions, sorted
        self.pre_epoch, self.round, self.history = 0, 0, []
        self.pre_seconds = 0.0

    def state(self) -> dict:
        return {"args": {k: getattr(self.a, k) for k in RESUME_KEYS}, "cae": self.cae.state_dict(),
                "clu": self.clu.state_dict(), "opt_pre": self.opt_pre.state_dict(),
                "opt": self.opt.state_dict(), "g": self.g.get_state(),
                "labeled": torch.from_numpy(self.labeled), "pre_epoch": self.pre_epoch,
                "round": self.round, "history": json.dumps(self.history),
                "pre_seconds": self.pre_seconds, "data": self.data_id, "pool_images": self.pool_id}

    def load_state(self, s: dict, where: str, pretrained: bool = False) -> None:
        """s's settings and data must be this run's: to resume, RESUME_KEYS and every image and
        label; for --pretrained, PRETRAIN_KEYS and the pool's images (all pre-training saw)."""
        keys = PRETRAIN_KEYS if pretrained else RESUME_KEYS
        mine = {k: getattr(self.a, k) for k in keys}
        diff = [f"--{k.replace('_', '-')} {s['args'].get(k)!r} (now {v!r})" for k, v in mine.items()
                if s["args"].get(k) != v]
        if diff:
            fail(f"{where} was made with {', '.join(diff)}; use the same settings, or another "
                 f"--out / --pretrained")
        # a checkpoint older than this check has neither digest: it resumes as before
        then, now = ((s.get("pool_images"), self.pool_id) if pretrained
                     else (s.get("data", {}).get("digest"), self.data_id["digest"]))
        changed = [k for k in (then or {}) if then[k] != now.get(k)]
        if changed:
            what = {"pool": "training images", "train": "training images or labels",
                    "test": "test images or labels"}
            usps = " (USPS: both files make the training pool)" if self.a.dataset == "usps" else ""
            fix = ("another --pretrained, or no --pretrained to pre-train on these files"
                   if pretrained else "or another --out")
            fail(f"{where} was made on other {' and '.join(what[k] for k in changed)} than the "
                 f"files in --data-dir {self.a.data_dir}{usps}; use the original files, {fix}")
        self.cae.load_state_dict(s["cae"])
        self.clu.load_state_dict(s["clu"])
        self.opt_pre.load_state_dict(s["opt_pre"])
        self.opt.load_state_dict(s["opt"])
        self.g.set_state(s["g"])
        self.labeled = s["labeled"].numpy()
        self.pre_epoch, self.round = s["pre_epoch"], s["round"]
        self.history, self.pre_seconds = json.loads(s["history"]), s["pre_seconds"]

    def save(self, name: str = "last.pt") -> None:
        state = self.state()
        atomic_write(os.path.join(self.a.out, name), lambda fh: torch.save(state, fh))


@torch.no_grad()
def encode_all(cae: model.CAE, x_u8: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Latents of a whole split in eval mode (BatchNorm running statistics)."""
    was = cae.training
    cae.eval()
    z = torch.cat([cae.encode(batch(x_u8[i:i + chunk])) for i in range(0, len(x_u8), chunk)]) \
        if len(x_u8) else torch.zeros(0, cae.latent)
    cae.train(was)
    return z


def pretrain_epoch(run: Run) -> float:
    """One epoch of Eq. 5, L_rec = mean (x - x_hat)^2, over the pool."""
    cae, opt, a = run.cae, run.opt_pre, run.a
    cae.train()
    total = torch.zeros(())
    perm = torch.randperm(len(run.x_pool), generator=run.g)
    for i in range(0, len(perm), a.batch_size):
        x = batch(run.x_pool[perm[i:i + a.batch_size]])
        loss = F.mse_loss(cae.decode(cae.encode(x)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
    return float(total) / math.ceil(len(perm) / a.batch_size)


def refresh_target(run: Run) -> torch.Tensor:
    """Eq. 3 over the whole pool (eval-mode latents, no gradient)."""
    with torch.no_grad():
        return losses.target_distribution(losses.soft_assign(encode_all(run.cae, run.x_pool),
                                                             run.clu.mu))


def train_step(run: Run, x_ulb: torch.Tensor, p_ulb: torch.Tensor, x_lb: torch.Tensor,
               y_lb: torch.Tensor) -> torch.Tensor:
    """a_rec L_rec + a_clu KL(P||Q) + a_ccl L_ccl; the labeled images share the encoder pass."""
    a, cae, mu = run.a, run.cae, run.clu.mu
    z = cae.encode(torch.cat([x_ulb, x_lb]))
    z_ulb, z_lb = z[:len(x_ulb)], z[len(x_ulb):]
    l_rec = F.mse_loss(cae.decode(z_ulb), x_ulb)
    l_clu = losses.kl_clustering(p_ulb, losses.soft_assign(z_ulb, mu))
    l_ccl = (torch.zeros(()) if a.no_ccl else
             losses.cluster_contrastive(z_lb, y_lb, mu, a.tau, a.ccl_form == "infonce"))
    loss = a.alpha_rec * l_rec + a.alpha_clu * l_clu + a.alpha_ccl * l_ccl
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    return torch.stack([l_rec, l_clu, l_ccl]).detach()


def train_round(run: Run, timing: dict) -> dict:
    """10 epochs over the pool; P refreshed at iterations 0, 80, 160, ... of the round."""
    a = run.a
    run.cae.train()
    lb = torch.from_numpy(run.labeled)
    y_lb_all = run.y_pool[lb]                    # the oracle's answers for the labeled set only
    sums, it, p = torch.zeros(3), 0, None
    lb_perm, lb_at = torch.randperm(len(lb), generator=run.g), 0
    for _ in range(a.epochs_per_round):
        perm = torch.randperm(len(run.x_pool), generator=run.g)
        for i in range(0, len(perm), a.batch_size):
            if it % a.update_interval == 0:
                t0 = time.perf_counter()
                p = refresh_target(run)
                run.cae.train()
                timing["refresh_P"] += time.perf_counter() - t0
            idx = perm[i:i + a.batch_size]
            take = lb_perm[lb_at:lb_at + a.batch_lb]   # labeled images cycle through a permutation
            lb_at += len(take)
            if lb_at >= len(lb):
                lb_perm, lb_at = torch.randperm(len(lb), generator=run.g), 0
            sums += train_step(run, batch(run.x_pool[idx]), p[idx], batch(run.x_pool[lb[take]]),
                               y_lb_all[take])
            it += 1
    return dict(zip(("l_rec", "l_clu", "l_ccl"), (sums / max(it, 1)).tolist()))


@torch.no_grad()
def accuracy(run: Run, x_u8: torch.Tensor, y: torch.Tensor) -> float | None:
    """Prediction = argmax_j q_ij: cluster j is class j."""
    if len(y) == 0:
        return None
    q = losses.soft_assign(encode_all(run.cae, x_u8), run.clu.mu)
    return float((q.argmax(1) == y).double().mean())


# ---------------------------------------------------------------- queries

def rank_entropy(h: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """Eq. 4: the n candidates with the highest entropy; ties go to the lower pool position."""
    check_query(n, len(candidates))
    order = np.lexsort((candidates, -h[candidates]))   # last key is the primary one
    return np.sort(candidates[order[:n]])


def kcenter_greedy(z: np.ndarray, labeled: np.ndarray, n: int, chunk: int = 4096) -> np.ndarray:
    """Core-set (Sener & Savarese 2018), k-center greedy: repeatedly take the pool point farthest
    (Euclidean, latent space) from every labeled or already chosen point; ties by lower index."""
    check_query(n, len(z) - len(labeled))
    z = torch.from_numpy(np.asarray(z, dtype=np.float64))
    dmin = torch.full((len(z),), math.inf, dtype=torch.float64)
    for i in range(0, len(labeled), chunk):
        dmin = torch.minimum(dmin, torch.cdist(z, z[labeled[i:i + chunk]]).min(1).values)
    dmin[torch.from_numpy(np.asarray(labeled, dtype=np.int64))] = -1.0  # never again, even at 0
    chosen = []
    for _ in range(n):
        j = int(torch.argmax(dmin))                    # first maximum = lowest index
        chosen.append(j)
        dmin = torch.minimum(dmin, (z - z[j]).square().sum(1).sqrt())
        dmin[j] = -1.0
    return np.sort(np.asarray(chosen, dtype=np.int64))


def check_query(n: int, available: int) -> None:
    if n > available:
        raise ValueError(f"cannot query {n} images: only {available} unlabeled pool images are "
                         f"left; lower --query-size or --rounds")


def query(run: Run, z_pool: torch.Tensor) -> np.ndarray:
    a, n = run.a, run.a.query_size
    unl = np.setdiff1d(np.arange(len(run.x_pool)), run.labeled)
    if a.query == "random":
        check_query(n, len(unl))
        rng = np.random.default_rng([a.seed, run.round])  # a stream per round: resumes exactly
        return np.sort(rng.choice(unl, n, replace=False))
    if a.query == "coreset":
        return kcenter_greedy(z_pool.numpy(), run.labeled, n)
    q = losses.soft_assign(z_pool.double(), run.clu.mu.detach().double())
    return rank_entropy(losses.entropy(q, validate=False).numpy(), unl, n)


# ---------------------------------------------------------------- outputs

def write_outputs(run: Run, z_pool: torch.Tensor) -> None:
    out = run.a.out
    buf = io.BytesIO()
    np.savez(buf, z=z_pool.numpy(), y=run.y_pool.numpy(), pool_index=run.pool,
             labeled=run.labeled, centroids=run.clu.mu.detach().numpy())
    atomic_write(os.path.join(out, "latents.npz"), lambda fh: fh.write(buf.getvalue()))
    summary = {"args": vars(run.a), "pool": len(run.pool), "val": len(run.val),
               "pretrain_seconds": run.pre_seconds, "history": run.history}
    write_text(os.path.join(out, "result.json"), json.dumps(summary, indent=1) + "\n")
    rows = [["round", "labels", "percent", "val_acc", "test_acc", "seconds"]]
    rows += [[h["round"], h["labels"], f"{100 * h['labels'] / len(run.pool):.2f}", h["val_acc"],
              h["test_acc"], f"{h['seconds']:.1f}"] for h in run.history]
    write_text(os.path.join(out, "history.csv"), csv_text(rows))


def csv_text(rows: list) -> str:
    s = io.StringIO()
    csv.writer(s, lineterminator="\n").writerows(rows)
    return s.getvalue()


def tsne_picture(out: str, points: int = 5000, seed: int = 0) -> None:
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        fail("--tsne needs scikit-learn: pip install scikit-learn")
    from report import import_pyplot, save_figure
    lat = np.load(os.path.join(out, "latents.npz"))
    pick = np.random.default_rng(seed).permutation(len(lat["z"]))[:points]
    e = TSNE(2, init="pca", random_state=seed).fit_transform(lat["z"][pick])
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(e[:, 0], e[:, 1], c=lat["y"][pick], cmap="tab10", s=2)
    ax.set_title(f"t-SNE of {len(pick)} pool latents (colour = class)")
    save_figure(fig, os.path.join(out, "tsne.png"))


def method_name(args: dict) -> str:
    q = {"entropy": "entropy", "random": "random", "coreset": "core-set"}[args["query"]]
    return f"{q} + CCL" + (" (InfoNCE)" if args["ccl_form"] == "infonce" else "") \
        if not args["no_ccl"] else f"{q}, clustering only"


def at_percent(history: list, pool: int, pct: float) -> float | None:
    """Validation accuracy of the first round with at least pct % of the pool labeled."""
    hit = [h for h in history if h["labels"] >= pct / 100 * pool - 1e-9]
    return hit[0]["val_acc"] if hit else None


def report(root: str) -> str:
    """Table in the style of their Tables 3-5 (+ CSV, plot) of every run under root."""
    runs = []
    for dirpath, _, files in sorted(os.walk(root)):
        if "result.json" in files:
            with open(os.path.join(dirpath, "result.json")) as f:
                runs.append(json.load(f))
    if not runs:
        fail(f"no run (result.json) under {root}")
    lines, rows = [], [["dataset", "method", "source", *[f"{p}%" for p in PERCENTS], "runs"]]
    for ds, pool in sorted({(r["args"]["dataset"], r["pool"]) for r in runs}):
        mine = [r for r in runs if (r["args"]["dataset"], r["pool"]) == (ds, pool)]
        labels = [math.ceil(p / 100 * pool) for p in PERCENTS]
        lines += [f"### {ds} (pool {pool}; validation accuracy; a column is the first round with "
                  f"at least {', '.join(map(str, labels))} labels)", "",
                  "| method | source | " + " | ".join(f"{p} %" for p in PERCENTS) + " | runs |",
                  "|---|---|" + "---|" * len(PERCENTS) + "---|"]
        for name, vals in (PAPER.get(ds, {}) if pool == PAPER_POOL[ds] else {}).items():
            cells = [f"{v:.3f}" for v in vals]
            lines.append(f"| {name} | published | " + " | ".join(cells) + " | - |")
            rows.append([ds, name, "published", *cells, ""])
        for name in sorted({method_name(r["args"]) for r in mine}):
            group = [r for r in mine if method_name(r["args"]) == name]
            cells = []
            for p in PERCENTS:
                v = [x for x in (at_percent(r["history"], pool, p) for r in group) if x is not None]
                cells.append("not run" if not v else f"{np.mean(v):.3f}" if len(v) == 1
                             else f"{np.mean(v):.3f} ± {np.std(v):.3f}")
            lines.append(f"| {name} | measured | " + " | ".join(cells) + f" | {len(group)} |")
            rows.append([ds, name, "measured", *cells, len(group)])
        lines.append("")
    text = "\n".join(lines)
    write_text(os.path.join(root, "table.md"), text + "\n")
    write_text(os.path.join(root, "table.csv"), csv_text(rows))
    plot(runs, os.path.join(root, "accuracy_vs_labels.png"))
    return text


def plot(runs: list, out: str) -> None:
    try:
        from report import import_pyplot, save_figure
        plt = import_pyplot()
    except SystemExit:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        h = r["history"]
        ax.plot([x["labels"] for x in h], [x["val_acc"] for x in h], marker=".",
                label=f"{r['args']['dataset']} {method_name(r['args'])} s{r['args']['seed']}")
    ax.set_xlabel("labeled images")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=7)
    save_figure(fig, out)


# ---------------------------------------------------------------- main

def read_state(path: str) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated / not a checkpoint
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); delete it to start over")


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.report:
        print(report(a.report))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        run = Run(a, load(a))
    except (ValueError, RuntimeError) as e:
        fail(str(e))
    os.makedirs(a.out, exist_ok=True)
    last = os.path.join(a.out, "last.pt")
    if os.path.exists(last):
        run.load_state(read_state(last), last)
        print(f"resuming {a.out}: pre-training epoch {run.pre_epoch}, round {run.round}")
    elif a.pretrained:
        src = os.path.join(a.pretrained, "pretrained.pt")
        if not os.path.isfile(src):
            fail(f"{src} does not exist: --pretrained needs a run whose pre-training has finished")
        run.load_state(read_state(src), src, pretrained=True)
        print(f"starting from the pre-training of {src}")
    if run.round > a.rounds:
        print(f"{a.out} is finished ({a.rounds} rounds); nothing to train")
        if a.tsne:
            tsne_picture(a.out)
        return
    while run.pre_epoch < a.pretrain_epochs:
        t0 = time.perf_counter()
        loss = pretrain_epoch(run)
        run.pre_epoch += 1
        run.pre_seconds += time.perf_counter() - t0
        if run.pre_epoch == a.pretrain_epochs:  # kept for --pretrained of the other strategies
            run.save("pretrained.pt")
        run.save()
        print(f"pretrain {run.pre_epoch}/{a.pretrain_epochs} L_rec {loss:.5f} "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    while run.round <= a.rounds:
        t0 = time.perf_counter()
        timing = {"refresh_P": 0.0}
        if run.round == 0:  # Eq. 6: cluster j starts at the mean latent of labeled class j
            lb = torch.from_numpy(run.labeled)
            try:
                run.clu.init_from(encode_all(run.cae, run.x_pool[lb]), run.y_pool[lb])
            except ValueError as e:
                fail(str(e))
        losses_ = train_round(run, timing) if a.epochs_per_round else {}
        timing["train"] = time.perf_counter() - t0 - timing["refresh_P"]
        t1 = time.perf_counter()
        val_acc = accuracy(run, run.x_val, run.y_val)
        test_acc = accuracy(run, run.x_test, run.y_test)
        z_pool = encode_all(run.cae, run.x_pool)
        timing["evaluate"] = time.perf_counter() - t1
        h = {"round": run.round, "labels": len(run.labeled), "val_acc": val_acc,
             "test_acc": test_acc, **losses_,
             "z_norm": float(z_pool.norm(dim=1).mean()),
             "mu_norm": float(run.clu.mu.detach().norm(dim=1).mean())}
        t1 = time.perf_counter()
        new = None  # after the last round too when the pool allows, so that --rounds can grow
        if run.round < a.rounds or a.query_size <= len(run.x_pool) - len(run.labeled):
            try:
                new = query(run, z_pool)
            except ValueError as e:
                fail(str(e))
        timing["query"] = time.perf_counter() - t1
        h["seconds"] = time.perf_counter() - t0
        h["timing"] = {k: round(v, 2) for k, v in timing.items()}
        run.history.append(h)
        write_outputs(run, z_pool)   # before the checkpoint: a resumed run rewrites them anyway
        if new is not None:
            run.labeled = np.sort(np.concatenate([run.labeled, new]))
        run.round += 1
        run.save()
        test = "n/a" if test_acc is None else f"{test_acc:.4f}"
        print(f"round {h['round']} labels {h['labels']} val {val_acc:.4f} test {test} "
              + " ".join(f"{k} {v:.4f}" for k, v in losses_.items())
              + f" |z| {h['z_norm']:.2f} {h['seconds']:.1f}s {h['timing']}", flush=True)
    if a.tsne:
        tsne_picture(a.out)


if __name__ == "__main__":
    main()
