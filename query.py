"""Active learning query: which training images should be labeled next (docs/active_learning.md).

    python query.py runs/r0 --n 40 --strategy entropy --out al/r1.txt
    python train.py --labeled-idx al/r1.txt ...            # the next round, from scratch

Scores every unlabeled training image with the run's EMA model (eval mode, no augmentation,
float32) and writes the next labeled set, old + N new indices, sorted, to --out (.txt, one index
per line, or .npy), the chosen ones with their scores to the .csv beside it, and what was done to
the .json beside it. The true labels are never used to choose: the dataset's labels play the
oracle only when train.py reads the file. Every score is keyed by training-set index.

Strategies (ties go to the smaller index):
  random            seeded uniform choice from the pool
  entropy           largest entropy H(p) of the method's class probabilities p
  margin            smallest p_top1 - p_top2
  least-confident   largest 1 - p_top1
  balanced-entropy  the entropy ranking taken round-robin over predicted classes: every class's
                    most uncertain image first, then every class's second, ...; at most
                    ceil(N/K) per predicted class while every class has candidates, the
                    shortfall of classes with too few filled by the others
  typical           TypiClust: k-means (k = |labeled| + N) on the normalised embeddings; from
                    each of the N largest clusters holding no labeled image, its most typical
                    image (1 / mean distance to its 20 nearest neighbours in the cluster)

p is softmax(cos(z, c_k) / T_pl) for base/entropy (Eq. 4) and softmax of the classifier logits
for fixmatch/ccssl/simmatch (for semi: of its balanced head 2, which predicts). The embedding is
z, the L2-normalised projection, except for FixMatch and SeMi, which train no projection (SeMi
unless --semi-feature projection): there, the L2-normalised backbone feature.
"""
import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
from checkpoint import (CheckpointError, DirLock, atomic_write, dumps_json, read_checkpoint,
                        remove_stale_temps, write_text)
from evaluate import check_run_data, classifier_run, load_run_model, outputs_all, resolve_dataset

STRATEGIES = ("random", "entropy", "margin", "least-confident", "balanced-entropy", "typical")
KNN = 20  # neighbours of TypiClust's typicality
MIN_CLUSTER = 5  # TypiClust leaves clusters this small (outliers) until no other has candidates


# ---------------------------------------------------------------- scores of class probabilities

def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_k p_k log p_k per row, in nats; 0 log 0 = 0 (exact zeros give no NaN)."""
    return -torch.special.xlogy(p, p).sum(1)


def margin(p: torch.Tensor) -> torch.Tensor:
    """p_top1 - p_top2 per row: small = the two most likely classes are hard to tell apart."""
    top2 = p.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def least_confidence(p: torch.Tensor) -> torch.Tensor:
    """1 - p_top1 per row."""
    return 1 - p.max(1).values


# ---------------------------------------------------------------- selection (numpy, by index)

def top_n(priority: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """Positions of the n largest priorities, ties to the smaller dataset index, in rank order."""
    return np.lexsort((idx, -priority))[:n]


def balanced_top_n(h: np.ndarray, pred: np.ndarray, idx: np.ndarray, n: int) -> np.ndarray:
    """Positions chosen by balanced-entropy, in rank order: each candidate's level is its rank
    among the candidates of its predicted class (by entropy, then index); levels are taken in
    turn, each in global entropy order. Per-class counts differ by at most one while every class
    has candidates; classes with fewer simply stop contributing."""
    order = np.lexsort((idx, -h))  # the global ranking
    by_class = order[np.argsort(pred[order], kind="stable")]  # grouped by class, ranking kept
    starts = np.searchsorted(pred[by_class], pred[by_class], side="left")
    level = np.empty(len(h), dtype=np.int64)
    level[by_class] = np.arange(len(h)) - starts
    return np.lexsort((idx, -h, level))[:n]


def kmeans(x: torch.Tensor, k: int, iters: int, g: torch.Generator) -> torch.Tensor:
    """Cluster of each row of x (N, D): k-means++ initialisation drawn with generator g (on x's
    device), then a fixed number of Lloyd iterations; a cluster left empty is re-seeded with the
    point farthest from its centroid. Deterministic for a given generator state, batched on x's device."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} points, got k = {k}")
    first = torch.randint(n, (1,), generator=g, device=x.device)
    centers = x[first]
    d2 = sq_dist(x, centers).squeeze(1)
    for _ in range(1, k):  # k-means++: the next center with probability proportional to d^2
        if d2.sum() > 0:
            nxt = torch.multinomial(d2 / d2.sum(), 1, generator=g)
        else:  # every point is already a center's duplicate
            nxt = torch.randint(n, (1,), generator=g, device=x.device)
        centers = torch.cat([centers, x[nxt]])
        d2 = torch.minimum(d2, sq_dist(x, x[nxt]).squeeze(1))
    for _ in range(iters):
        assign, dist = nearest(x, centers)
        counts = torch.bincount(assign, minlength=k)  # integer: exact in any order
        sums = cluster_sums(x, assign, k)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        empty = (counts == 0).nonzero().squeeze(1)
        if len(empty):  # re-seed: the points worst served by their centroid, farthest first
            far = torch.sort(dist, descending=True, stable=True).indices[:len(empty)]
            centers[empty] = x[far]
    return nearest(x, centers)[0]


def cluster_sums(x: torch.Tensor, assign: torch.Tensor, k: int, chunk: int = 8192) -> torch.Tensor:
    """(k, D) sum of the rows of each cluster, as one-hot matrix products in a fixed order: the
    same bits on every run (index_add_ is not deterministic on CUDA)."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    for i in range(0, len(x), chunk):
        sums += F.one_hot(assign[i:i + chunk], k).to(x.dtype).T @ x[i:i + chunk]
    return sums


def sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, M), clamped at 0 against rounding."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).clamp(min=0)


def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest center, squared distance to it) per row of x, in chunks."""
    parts = [sq_dist(x[i:i + chunk], c).min(1) for i in range(0, len(x), chunk)]
    return torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts])


def typicality(x: torch.Tensor, knn: int = KNN, chunk: int = 4096) -> torch.Tensor:
    """1 / mean Euclidean distance of each row to its min(knn, N - 1) nearest other rows
    (TypiClust). A lone point has no neighbours, hence no density: typicality 0."""
    n = len(x)
    m = min(knn, n - 1)
    if m == 0:
        return torch.zeros(n, device=x.device)
    out = []
    for i in range(0, n, chunk):
        d = sq_dist(x[i:i + chunk], x)
        d[torch.arange(len(d)), torch.arange(i, i + len(d))] = math.inf  # not its own neighbour
        out.append(1 / d.topk(m, dim=1, largest=False).values.sqrt().mean(1).clamp(min=1e-12))
    return torch.cat(out)


def typical_n(emb: torch.Tensor, is_labeled: np.ndarray, n: int, iters: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """TypiClust on emb (rows = labeled and pool images, by ascending dataset index): k-means with
    k = |labeled| + n; n times, the cluster with the fewest labeled or chosen images (ties: the
    larger cluster, then the lower cluster id) gives its most typical unchosen pool image (ties:
    the smaller index). With enough clusters free of labels that is one image from each of the n
    largest such clusters. As in TypiClust, clusters of MIN_CLUSTER or fewer images (outliers)
    come last. Returns (positions in emb rows, their typicality), in rank order."""
    g = torch.Generator(emb.device).manual_seed(seed)
    k = int(is_labeled.sum()) + n
    assign = kmeans(emb, k, iters, g).cpu().numpy()
    size = np.bincount(assign, minlength=k)
    taken = np.bincount(assign[is_labeled], minlength=k)
    free = np.bincount(assign[~is_labeled], minlength=k)  # pool images not yet chosen
    typ: dict[int, np.ndarray] = {}
    chosen, scores = [], []
    for _ in range(n):
        cand = np.flatnonzero(free > 0)
        c = cand[np.lexsort((cand, -size[cand], taken[cand], size[cand] <= MIN_CLUSTER))[0]]
        if c not in typ:
            members = np.flatnonzero(assign == c)
            t = typicality(emb[torch.from_numpy(members).to(emb.device)]).cpu().numpy()
            t[is_labeled[members]] = -np.inf  # labeled images are neighbours, never candidates
            typ[c] = (members, t)
        members, t = typ[c]
        j = int(np.argmax(t))  # argmax: the first maximum = the smaller index
        chosen.append(members[j])
        scores.append(t[j])
        t[j] = -np.inf
        taken[c] += 1
        free[c] -= 1
    return np.array(chosen, dtype=np.int64), np.array(scores, dtype=np.float64)


# ---------------------------------------------------------------- scoring a run

def run_path(state: dict, path: str) -> str:
    """A path the run saved, relative to where it was started (state["cwd"])."""
    return path if os.path.isabs(path) else os.path.join(state.get("cwd", ""), path)


def same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def probabilities(state: dict, scores: torch.Tensor) -> torch.Tensor:
    """The method's own class probabilities: softmax(cos / T_pl) of Eq. (4) for prototype runs,
    softmax of the classifier logits for the peers."""
    if not classifier_run(state):
        scores = scores / state["args"].get("pl_temp", 0.1)
    return torch.softmax(scores.double(), dim=1)


def embeddings(state: dict, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """z, the contrastive projection; FixMatch trains none, and SeMi none unless --semi-feature
    projection, so their normalised backbone feature."""
    a = state["args"]
    pooled = a["loss"] == "fixmatch" or (a["loss"] == "semi" and a.get("semi_feature") != "projection")
    return F.normalize(h, dim=1) if pooled else z


def choose(strategy: str, n: int, pool: np.ndarray, p: torch.Tensor, emb: torch.Tensor | None,
           is_labeled: np.ndarray, seed: int, iters: int, n_train: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """(positions in pool chosen, in rank order; their strategy scores). p holds the pool's class
    probabilities; emb (typical only) the labeled and pool embeddings, rows in ascending index
    order, is_labeled marking the labeled rows; n_train the size of the training set."""
    if strategy == "typical":
        rows, score = typical_n(emb, is_labeled, n, iters, seed)
        pos = np.flatnonzero(~is_labeled)  # emb row -> pool position
        lookup = np.full(len(is_labeled), -1)
        lookup[pos] = np.arange(len(pos))
        return lookup[rows], score
    if strategy == "random":
        # one key per dataset index: with the same seed every round, the rounds take the next
        # images of one fixed random order (uniform sampling without replacement)
        key = np.random.default_rng(seed).random(n_train)[pool]
        pick = top_n(key, pool, n)
        return pick, key[pick]
    h = entropy(p).cpu().numpy()
    if strategy == "entropy":
        pick = top_n(h, pool, n)
        return pick, h[pick]
    if strategy == "margin":
        m = margin(p).cpu().numpy()
        pick = top_n(-m, pool, n)
        return pick, m[pick]
    if strategy == "least-confident":
        lc = least_confidence(p).cpu().numpy()
        pick = top_n(lc, pool, n)
        return pick, lc[pick]
    if strategy == "balanced-entropy":
        pick = balanced_top_n(h, p.argmax(1).cpu().numpy(), pool, n)
        return pick, h[pick]
    raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


# ---------------------------------------------------------------- files

def index_file_bytes(path: str, idx: np.ndarray, query_id: str) -> bytes:
    """Sorted indices as train.py --labeled-idx reads them: .npy, or text one per line after a
    "# query ID" comment line (a .npy cannot hold one: the .json's out_sha256 names its bytes)."""
    if path.endswith(".npy"):
        buf = io.BytesIO()
        np.save(buf, idx.astype(np.int64))
        return buf.getvalue()
    return (f"# query {query_id}\n" + "".join(f"{i}\n" for i in idx)).encode()


def write_index_file(path: str, idx: np.ndarray, query_id: str = "") -> None:
    payload = index_file_bytes(path, idx, query_id)
    atomic_write(path, lambda fh: fh.write(payload))


def check_query_files(out: str) -> str:
    """The query id if OUT and its .csv and .json describe one query, else a ValueError."""
    csv_path, json_path = side_files(out)
    with open(json_path) as fh:
        rec = json.load(fh)
    with open(out, "rb") as fh:
        if hashlib.sha256(fh.read()).hexdigest() != rec["out_sha256"]:
            raise ValueError(f"{out} is not the labeled set that {json_path} describes")
    with open(csv_path) as fh:
        ids = {row["query_id"] for row in csv.DictReader(fh)}
    if ids != {rec["query_id"]}:
        raise ValueError(f"{csv_path} is not the query that {json_path} describes")
    return rec["query_id"]


def side_files(out: str) -> tuple[str, str]:
    stem = out[:-4] if out.endswith((".txt", ".npy")) else out
    return stem + ".csv", stem + ".json"


# ---------------------------------------------------------------- main

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and "(default: X)" where there is a default."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run", help="a run's output dir (its last.pt, or prev.pt) or a checkpoint file")
    p.add_argument("--n", type=int, required=True, help="images to add to the labeled set")
    p.add_argument("--strategy", choices=STRATEGIES, required=True, help="see above")
    p.add_argument("--out", required=True,
                   help="the next labeled set, FILE.txt or FILE.npy; FILE.csv and FILE.json "
                        "are written beside it")
    p.add_argument("--seed", type=int, default=0, help="seed of random and of typical's k-means")
    p.add_argument("--kmeans-iters", type=int, default=50, help="Lloyd iterations of typical")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=1024, help="images per scoring batch")
    p.add_argument("--dataset", default=None, help="the run's dataset, if it has moved")
    p.add_argument("--data-dir", default=None, help="the run's data dir, if it has moved")
    args = p.parse_args(argv)
    for name in ("n", "batch_size", "kmeans_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if os.path.isdir(args.out):
        p.error(f"--out {args.out} is a directory; name a file, e.g. {args.out.rstrip('/')}/r1.txt")
    if not args.out.endswith((".txt", ".npy")):
        p.error(f"--out {args.out}: name the labeled set FILE.txt or FILE.npy (FILE.csv and "
                f"FILE.json are written beside it)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", args.device):
        p.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return args


def query(args: argparse.Namespace) -> dict:
    """Score the pool, choose, write the three files; returns the .json record."""
    state, ckpt = read_checkpoint(args.run)
    a = state["args"]
    if a.get("lt_labeled"):
        n_ulb = len(state["unlabeled_idx"]) if "unlabeled_idx" in state else "a subset"
        raise ValueError(f"{args.run} is a long-tailed run (--lt-labeled): its unlabeled set is "
                         f"{n_ulb} chosen images, but a round trained on a query "
                         f"(train.py --labeled-idx) takes the whole training set as unlabeled "
                         f"data, so the next round would change it; start active learning from a "
                         f"--labels-per-class or --labeled-idx run")
    if a.get("labeled_idx") and same_file(run_path(state, a["labeled_idx"]), args.out):
        raise ValueError(f"--out {args.out} is the labeled set the run was trained on; write the "
                         f"next round to a new file (the run's resume check needs the old one)")
    if os.path.exists(args.out):
        print(f"warning: overwriting {args.out}", file=sys.stderr)
    total = a["epochs"] * a["steps_per_epoch"]
    if state["step"] < total:
        print(f"warning: {ckpt} is at step {state['step']} of {total}: the run has not finished",
              file=sys.stderr)
    name, ddir = resolve_dataset(a, state, args.dataset, args.data_dir)
    ds = data.load_dataset(name, ddir, a.get("image_size"))
    n_train = len(ds["x_train"])
    labeled = np.sort(state["labeled_idx"].numpy())
    unlabeled = state["unlabeled_idx"].numpy() if "unlabeled_idx" in state else np.arange(n_train)
    unlabeled = unlabeled[unlabeled < n_train]  # images without a label (x_unlabeled) have no oracle
    if len(state.get("classes") or []) not in (0, ds["num_classes"]) or labeled.max() >= n_train:
        raise ValueError(f"{name} ({ds['num_classes']} classes, {n_train} training images) is not "
                         f"the dataset {ckpt} was trained on; pass it with --dataset / --data-dir")
    check_run_data(state, ds, name, ckpt, "train", strict=True)
    pool = np.setdiff1d(unlabeled, labeled)  # sorted, unique
    if args.n > len(pool):
        raise ValueError(f"--n {args.n} is more than the {len(pool)} unlabeled images left")

    dev = torch.device(args.device)
    torch.backends.cudnn.deterministic = True  # the same scores, hence the same query, every time
    model = load_run_model(state, ds["num_classes"], dev)
    norm = data.Normalize(state["mean"], state["std"], dev)
    rows = np.union1d(labeled, pool)  # every image scored, in ascending index order
    x = data.to_tensor_images(ds["x_train"][rows], dev)
    scores, z, h = outputs_all(model, x, norm, args.batch_size)
    is_labeled = np.isin(rows, labeled)
    in_pool = torch.from_numpy(~is_labeled).to(dev)
    p = probabilities(state, scores[in_pool])
    emb = embeddings(state, z, h) if args.strategy == "typical" else None
    pick, score = choose(args.strategy, args.n, pool, p, emb, is_labeled, args.seed,
                         args.kmeans_iters, n_train)

    new = pool[pick]
    p_pick = p[torch.from_numpy(pick).to(dev)]
    pred = p_pick.argmax(1).cpu().numpy()
    prob = p_pick.max(1).values.cpu().numpy()
    ent = entropy(p_pick).cpu().numpy()
    mar = margin(p_pick).cpu().numpy()
    classes = list(ds["classes"])
    csv_path, json_path = side_files(args.out)
    after = np.union1d(labeled, new)
    ckpt_sha = data.sha256_of(ckpt)
    # one id in all three files: which query they describe (deterministic, like the query)
    query_id = hashlib.sha256(f"{ckpt_sha} {args.strategy} {args.n} {args.seed} "
                              f"{args.kmeans_iters} ".encode() + after.astype("<i8").tobytes()
                              ).hexdigest()[:16]
    table = io.StringIO()
    w = csv.writer(table, lineterminator="\n")
    w.writerow(["rank", "index", "score", "pred", "pred_name", "prob", "entropy", "margin",
                "query_id"])
    w.writerows([r, i, f"{s:.6g}", c, classes[c], f"{q:.6f}", f"{e:.6f}", f"{m:.6f}", query_id]
                for r, (i, s, c, q, e, m) in enumerate(zip(new, score, pred, prob, ent, mar), 1))
    payload = index_file_bytes(args.out, after, query_id)
    record = {"query_id": query_id, "run": args.run, "checkpoint": ckpt,
              "checkpoint_sha256": ckpt_sha,
              "step": state["step"], "loss": a["loss"], "strategy": args.strategy, "n": args.n,
              "seed": args.seed, "kmeans_iters": args.kmeans_iters, "pool_size": int(len(pool)),
              "labeled_before": int(len(labeled)), "labeled_after": int(len(labeled) + len(new)),
              "per_predicted_class": {classes[c]: int((pred == c).sum())
                                      for c in range(ds["num_classes"])},
              "out": args.out, "out_sha256": hashlib.sha256(payload).hexdigest(), "csv": csv_path}
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with DirLock(folder, "query.py"):  # one writer of these files at a time
        for path in (args.out, csv_path, json_path):
            remove_stale_temps(path)  # left by a query killed while writing
        if os.path.exists(args.out):  # gone first: a kill below leaves no .txt of another query
            os.remove(args.out)
        write_text(csv_path, table.getvalue())
        write_text(json_path, dumps_json(record, indent=1) + "\n")
        atomic_write(args.out, lambda fh: fh.write(payload))  # last: its existence means done
    return record


def main(argv=None) -> None:
    args = get_args(argv)
    try:
        r = query(args)
    except (CheckpointError, ValueError, OSError, RuntimeError) as e:
        sys.exit(f"query.py: error: {e}")
    except KeyError as e:
        sys.exit(f"query.py: error: {args.run} is not a checkpoint of train.py (no {e} in it)")
    counts = ", ".join(f"{k} {v}" for k, v in r["per_predicted_class"].items() if v)
    print(f"{r['strategy']}: {r['n']} of {r['pool_size']} unlabeled images chosen with "
          f"{r['checkpoint']} (step {r['step']}) -> {args.out} ({r['labeled_after']} labeled); "
          f"predicted classes: {counts}")


if __name__ == "__main__":
    main()
