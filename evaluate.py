"""Accuracy of a trained run, and the Table 1 aggregation over runs.

    python evaluate.py runs/cifar10_4_entropy_s0            # top-1 of the EMA model
    python evaluate.py runs/.../last.pt --per-class         # plus per-class accuracy
    python evaluate.py --table runs                         # Table 1 markdown (writes table1.md)
    python evaluate.py --al-table results_al                # active learning rounds of al.sh
"""
import argparse
import glob
import json
import os
import statistics
import sys

import numpy as np
import torch

CKPT_NAMES = ("last.pt", "prev.pt")  # newest first; prev.pt is the one before last.pt
PAPER = {  # [N&O] Table 1, top-1 test accuracy (%), WRN-28-2
    ("cifar10", 4): (94.41, 94.59), ("cifar10", 25): (94.71, 94.55),
    ("cifar100", 4): (45.13, 46.39), ("cifar100", 25): (64.44, 64.97),
}


class CheckpointError(Exception):
    pass


def read_checkpoint(path: str) -> tuple[dict, str]:
    """Load OUT/last.pt (falling back to OUT/prev.pt if last.pt is unreadable) or a given file,
    with weights_only=True so that a checkpoint cannot run code. Returns (state, file)."""
    files = [os.path.join(path, n) for n in CKPT_NAMES] if os.path.isdir(path) else [path]
    files = [f for f in files if os.path.exists(f)]
    if not files:
        raise CheckpointError(f"no checkpoint found at {path}")
    for f in files:
        try:
            return torch.load(f, map_location="cpu", weights_only=True), f
        except Exception:  # noqa: BLE001 - truncated, corrupt or unsafe: all the same to us
            if len(files) > 1 and f != files[-1]:
                print(f"warning: checkpoint {f} is unreadable (truncated or corrupt); "
                      f"falling back to {files[files.index(f) + 1]}", file=sys.stderr)
    names = " and ".join(files)
    raise CheckpointError(f"no readable checkpoint: {names} {'are' if len(files) > 1 else 'is'} "
                          f"truncated, corrupt or not a plain-tensor checkpoint; delete "
                          f"{'them' if len(files) > 1 else 'it'} to start the run over")


@torch.no_grad()
def predict_all(model: torch.nn.Module, x_u8: torch.Tensor, normalize,
                batch_size: int = 1024) -> torch.Tensor:
    """Predictions (nearest prototype, or classifier argmax for the peers) for uint8 images
    (N, 3, H, W), model in eval mode, in float32: autocast is switched off even inside a caller's
    autocast region, so training-time and evaluate.py accuracies agree, as in [G]'s evaluation."""
    return scores_all(model, x_u8, normalize, batch_size).argmax(1)


def accuracy(model, x_u8, y, normalize, batch_size: int = 1024) -> float:
    return (predict_all(model, x_u8, normalize, batch_size) == y).float().mean().item()


@torch.no_grad()
def outputs_all(model: torch.nn.Module, x_u8: torch.Tensor, normalize, batch_size: int = 1024
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores (N, K), z, h) of model.scores_and_features for uint8 images, batched, in eval mode
    (BatchNorm statistics untouched) and float32 (autocast off, even inside a caller's autocast)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x_u8), batch_size):
        with torch.autocast(x_u8.device.type, enabled=False):
            out.append(model.scores_and_features(normalize(x_u8[i:i + batch_size])))
    model.train(was_training)
    return tuple(torch.cat(t) for t in zip(*out))


def scores_all(model: torch.nn.Module, x_u8: torch.Tensor, normalize,
               batch_size: int = 1024) -> torch.Tensor:
    """(N, K) class scores (model.class_scores) in eval mode and float32 (autocast off)."""
    return outputs_all(model, x_u8, normalize, batch_size)[0]


def class_groups(labeled_counts: list[int]) -> dict[str, list[int]]:
    """Head / medium / tail classes (README: long-tailed): classes sorted by labeled count, most
    first (ties by class index), cut into ceil(K/3), K - 2 ceil(K/3) and ceil(K/3) classes."""
    k = len(labeled_counts)
    order = sorted(range(k), key=lambda c: (-labeled_counts[c], c))
    third = -(-k // 3)
    return {"head": order[:third], "medium": order[third:k - third], "tail": order[k - third:]}


def logit_adjusted(scores: torch.Tensor, prior: torch.Tensor, tau: float) -> torch.Tensor:
    """Menon et al. 2021: argmax_k [s_k - tau log pi_k], pi = the labeled class prior."""
    return (scores - tau * torch.log(prior.to(scores)).clamp(min=-1e4)).argmax(1)


def eval_metrics(scores: torch.Tensor, y: torch.Tensor, labeled_counts: list[int],
                 tau: float = 1.0) -> dict:
    """Overall, per-class and head / medium / tail accuracy, raw and logit-adjusted (README:
    long-tailed).
    On a balanced test set the overall accuracy is the balanced accuracy."""
    k = scores.shape[1]
    prior = torch.tensor(labeled_counts, dtype=torch.float64) / max(sum(labeled_counts), 1)
    out = {}
    for suffix, pred in (("", scores.argmax(1)), ("_adjusted", logit_adjusted(scores, prior, tau))):
        right = (pred == y).double().cpu()
        per = [right[(y == c).cpu()].mean().item() if (y == c).any() else None for c in range(k)]
        out[f"test_acc{suffix}"] = right.mean().item()
        out[f"per_class_acc{suffix}"] = per
        for g, members in class_groups(labeled_counts).items():
            vals = [per[c] for c in members if per[c] is not None]
            out[f"{g}_acc{suffix}"] = sum(vals) / len(vals) if vals else None
    return out


def resolve_dataset(a: dict, state: dict, dataset: str | None, data_dir: str | None
                    ) -> tuple[str, str]:
    """The run's dataset and data dir, found from any working directory: a relative path that
    does not exist from here is taken relative to where the run was started (state["cwd"]).
    --dataset / --data-dir override a moved dataset."""
    def here_or_there(path: str) -> str:
        if os.path.isabs(path) or os.path.exists(path) or "cwd" not in state:
            return path
        return os.path.join(state["cwd"], path)
    name = dataset or a["dataset"]
    if name.startswith("npz:"):
        name = "npz:" + here_or_there(name[4:])
    return name, data_dir or here_or_there(a["data_dir"])


def classifier_run(state: dict) -> bool:
    """A peer method's run: its EMA model has a linear classifier instead of prototypes."""
    return any(k.startswith("classifier.") for k in state["ema"])


def load_run_model(state: dict, num_classes: int, device: str):
    """The EMA model of a checkpoint, as the run built it."""
    from model import Encoder
    a = state["args"]
    classifier = classifier_run(state)
    # runs from before --wrn-variant existed used the TensorFlow-original network
    model = Encoder(num_classes, a["arch"], classifier=classifier,
                    variant=a.get("wrn_variant", "tf")).to(device)
    model.load_state_dict(state["ema"])
    return model


def evaluate_checkpoint(path: str, per_class: bool = False, data_dir: str | None = None,
                        device: str = "cpu", dataset: str | None = None) -> dict:
    import data
    state, f = read_checkpoint(path)
    a = state["args"]
    name, ddir = resolve_dataset(a, state, dataset, data_dir)
    ds = data.load_dataset(name, ddir)
    k_ckpt = len(state.get("classes") or []) or None
    if k_ckpt is not None and k_ckpt != ds["num_classes"]:
        raise ValueError(f"{name} has {ds['num_classes']} classes but the run in {f} was trained "
                         f"on {k_ckpt}; pass the run's dataset with --dataset / --data-dir")
    model = load_run_model(state, ds["num_classes"], device)
    x = data.to_tensor_images(ds["x_test"], device)
    y = torch.from_numpy(ds["y_test"]).to(device)
    norm = data.Normalize(state["mean"], state["std"], device)
    scores = scores_all(model, x, norm)
    if not classifier_run(state):
        scores = scores / a.get("pl_temp", 0.1)  # cos / T_pl, Eq. (4)
    pred = scores.argmax(1)
    counts = np.bincount(ds["y_train"][state["labeled_idx"].numpy()], minlength=ds["num_classes"])
    out = {"checkpoint": f, "step": state["step"], "top1": (pred == y).float().mean().item(),
           "dataset": name, "n_test": len(y), "labeled_counts": counts.tolist(),
           "metrics": eval_metrics(scores, y, counts.tolist(), a.get("logit_adjust", 1.0))}
    if per_class:
        k = ds["num_classes"]
        out["classes"] = list(ds["classes"])
        out["confusion"] = torch.zeros(k * k, dtype=torch.long).index_add_(
            0, (y * k + pred).cpu(), torch.ones(len(y), dtype=torch.long)).view(k, k).numpy()
        out["per_class"] = {ds["classes"][c]: (pred[y == c] == c).float().mean().item()
                            for c in range(k) if (y == c).any()}
        out["per_class_count"] = {ds["classes"][c]: int((y == c).sum()) for c in range(k)}
    return out


# ---------------------------------------------------------------- tables

# Settings that do not change what is measured: runs that differ only in these (and the seed)
# are seeds of one experiment. Every other setting, including flags added later, separates rows.
NOT_CONFIG = {"seed", "out", "data_dir", "device", "log_every", "eval_every", "save_every",
              "compile", "eval_batch_size", "tensorboard", "amp", "channels_last",
              "skip_nonfinite", "debug_nan_step", "out_created"}
# the protocol of [N&O] Table 1 (README: notes); a run at another setting of these is its own row
PROTOCOL = {"epochs": 256, "steps_per_epoch": 1024, "batch_size": 64, "mu": 7, "lr": 0.03,
            "arch": "wrn-28-2", "threshold": 0.95, "ema_decay": 0.999}
CELLS = [("cifar10", 4), ("cifar10", 25), ("cifar100", 4), ("cifar100", 25)]
# published accuracy %, in CELLS order (CIFAR-10 40 / 250 labels, CIFAR-100 400 / 2500; WRN-28-8)
PEER_PUBLISHED = {
    "fixmatch": ([86.19, 94.93, 51.15, 71.71], "FixMatch (RA), SimMatch paper Table 1"),
    "ccssl": ([90.83, 94.86, 61.19, 75.7], "CCSSL authors' README"),
    "simmatch": ([94.40, 95.16, 62.19, 74.93], "SimMatch paper, Table 1"),
    "base": ([PAPER[c][0] for c in CELLS], "[N&O] Table 1, WRN-28-2"),
    "entropy": ([PAPER[c][1] for c in CELLS], "[N&O] Table 1, WRN-28-2"),
}


def config_key(a: dict) -> tuple:
    """The configuration of a run's arguments. A flag at None is left out: that is how a run
    from before the flag existed reads it, so the two stay seeds of one experiment."""
    return tuple(sorted((k, repr(v)) for k, v in a.items() if k not in NOT_CONFIG and v is not None))


def collect_results(results_dir: str, field=lambda r: float(r["final_acc"])) -> dict:
    """{configuration without the seed: (args of one run, [100 x field(result) of each seed])}
    from every readable result.json below results_dir; unreadable ones are skipped with a
    warning."""
    groups = {}
    for f in sorted(glob.glob(os.path.join(results_dir, "**", "result.json"), recursive=True)):
        try:
            with open(f) as fh:
                r = json.load(fh)
            a, acc = r["args"], field(r)
            acc = None if acc is None else 100.0 * acc
            a["dataset"], a["labels_per_class"], a["loss"]  # noqa: B018 - required keys
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"warning: skipping {f}: unreadable or incomplete ({type(e).__name__}: {e})",
                  file=sys.stderr)
            continue
        groups.setdefault(config_key(a), (a, []))[1].append(acc)
    return groups


def format_cell(vals: list[float] | None) -> str:
    vals = [v for v in vals or [] if v is not None]
    if not vals:
        return "not run"
    if len(vals) == 1:
        return f"{vals[0]:.2f} (1 seed)"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} ({len(vals)} seeds)"


def at_protocol(a: dict) -> bool:
    return all(a.get(k) == v for k, v in PROTOCOL.items())


def differing(a: dict, others: list[dict]) -> str:
    """The settings of run a that differ from the paper protocol or from the other rows of its
    cell, as flags."""
    keys = {k for k, v in PROTOCOL.items() if a.get(k) != v}
    keys |= {k for b in others for k in set(a) | set(b)
             if k not in NOT_CONFIG and a.get(k) != b.get(k)}
    keys.discard("labeled_idx_sha256")  # the file's path says which labeled set
    return " ".join(f"--{k.replace('_', '-')} {a.get(k)}" for k in sorted(keys)) or "-"


def table1(results_dir: str) -> str:
    """Table 1 (paper protocol, one configuration per cell), the peers beside their published
    numbers, and every other configuration or dataset as its own row."""
    groups = collect_results(results_dir)
    paper = {}  # (dataset, n, loss) -> [group keys at the paper protocol]
    for key, (a, _) in groups.items():
        if (a["dataset"], a["labels_per_class"]) in CELLS and at_protocol(a):
            paper.setdefault((a["dataset"], a["labels_per_class"], a["loss"]), []).append(key)
    used = {keys[0] for keys in paper.values() if len(keys) == 1}

    def cell(ds, n, loss):
        keys = paper.get((ds, n, loss), [])
        if len(keys) > 1:
            return f"{len(keys)} configurations, see below"
        return format_cell(groups[keys[0]][1] if keys else None)

    lines = ["| dataset | labels/class | base [G] (paper) | base [G] (ours) | "
             "w.ent [N&O] (paper) | w.ent [N&O] (ours) |", "|---|---|---|---|---|---|"]
    for ds, n in CELLS:
        p_base, p_ent = PAPER[(ds, n)]
        lines.append(f"| {NAMES[ds]} | {n} | {p_base:.2f} | {cell(ds, n, 'base')} | {p_ent:.2f} | "
                     f"{cell(ds, n, 'entropy')} |")
    lines.append("\nTop-1 test accuracy (%) of the EMA model at the end of training, mean ± std "
                 "over seeds; runs at the paper's protocol (256 x 1024 steps, B 64, mu 7, "
                 "WRN-28-2).\n")
    methods = sorted({a["loss"] for a, _ in groups.values()} - {"base", "entropy"})
    if methods:
        lines += peer_table(methods, cell)
    rest = [k for k in groups if k not in used]
    if rest:
        lines += other_rows(groups, rest)
    return "\n".join(lines) + "\n"


NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def peer_table(methods: list[str], cell) -> list[str]:
    head = " | ".join(f"{NAMES[ds]} {n * (10 if ds == 'cifar10' else 100)} labels: ours / "
                      f"published" for ds, n in CELLS)
    lines = ["### Every method under one protocol", "", f"| method | {head} | published source |",
             "|---|" + "---|" * (len(CELLS) + 1)]
    for m in ["base", "entropy"] + methods:
        pub, src = PEER_PUBLISHED.get(m, ([None] * 4, "-"))
        vals = " | ".join(f"{cell(ds, n, m)} / {'-' if p is None else p}"
                          for (ds, n), p in zip(CELLS, pub))
        lines.append(f"| {m} | {vals} | {src} |")
    lines.append("\nPublished numbers come from other codebases and protocols; the CIFAR-100 "
                 "peer numbers used WRN-28-8 (ours: WRN-28-2).\n")
    return lines


def other_rows(groups: dict, keys: list) -> list[str]:
    lines = ["### Other configurations and datasets", "",
             "| dataset | labels/class | method | settings that differ | top-1 (%) |",
             "|---|---|---|---|---|"]
    rows = []
    for key in keys:
        a, vals = groups[key]
        same = [groups[k][0] for k in groups if k != key and
                (groups[k][0]["dataset"], groups[k][0]["labels_per_class"], groups[k][0]["loss"])
                == (a["dataset"], a["labels_per_class"], a["loss"])]
        split = (a["labels_per_class"] if a["labels_per_class"] is not None else
                 "long-tailed" if a.get("lt_labeled") else "--labeled-idx")
        rows.append((a["dataset"], split, a["loss"], differing(a, same), format_cell(vals)))
    lines += [f"| {d} | {n} | {m} | {diff} | {v} |" for d, n, m, diff, v in sorted(rows, key=str)]
    return lines


LT_COLUMNS = [("overall", "test_acc"), ("head", "head_acc"), ("medium", "medium_acc"),
              ("tail", "tail_acc"), ("overall, logit-adjusted", "test_acc_adjusted"),
              ("tail, logit-adjusted", "tail_acc_adjusted")]


def lt_table(results_dir: str) -> str:
    """The long-tailed runs (README: long-tailed): one row per setting and method configuration, final
    accuracies mean ± std over seeds, raw and logit-adjusted, plus FixMatch's median of the
    last 20 evaluations."""
    cols = {name: collect_results(results_dir, lambda r, k=key: r.get("final", {}).get(k))
            for name, key in LT_COLUMNS}
    cols["median of last 20"] = collect_results(results_dir, lambda r: r["median_last20_acc"])
    keys = sorted((k for k, (a, _) in cols["overall"].items() if a.get("lt_labeled")),
                  key=lambda k: str(lt_setting(cols["overall"][k][0])))
    head = " | ".join(cols)
    lines = [f"| dataset | N1 / M1 / gamma_l / gamma_u | method | {head} |",
             "|---|---|---|" + "---|" * len(cols)]
    for key in keys:
        a = cols["overall"][key][0]
        method = a["loss"] + (f" --hard-weight {a['hard_weight']}" if a.get("hard_weight") else "")
        lines.append(f"| {a['dataset']} | {lt_setting(a)} | {method} | "
                     + " | ".join(format_cell(cols[c][key][1]) for c in cols) + " |")
    return "\n".join(lines) + ("\n\nTop-1 test accuracy (%), balanced test set; head / medium / "
                               "tail = classes by labeled count; mean ± std over seeds.\n")


def lt_setting(a: dict) -> str:
    return f"{a['lt_labeled']} / {a['lt_unlabeled']} / {a['imb_ratio_l']:g} / {a['imb_ratio_u']:g}"


# ---------------------------------------------------------------- active learning (al.sh)

def al_results(results_dir: str) -> dict:
    """{(strategy, round): {seed: (labeled count, final accuracy %)}} from al.sh's layout:
    SEED_DIR/r0 (round 0, shared by every strategy) and SEED_DIR/STRATEGY/rR. Unreadable
    result.json files are skipped with a warning."""
    found = {}
    pattern = os.path.join(glob.escape(results_dir), "s*", "**", "r*", "result.json")
    for f in sorted(glob.glob(pattern, recursive=True)):
        parts = os.path.relpath(f, results_dir).split(os.sep)
        if len(parts) not in (3, 4) or not parts[-2][1:].isdigit() or not parts[0][1:].isdigit():
            continue
        try:
            with open(f) as fh:
                r = json.load(fh)
            point = (sum(r["labeled_counts"]), 100.0 * float(r["final_acc"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"warning: skipping {f}: unreadable or incomplete ({type(e).__name__}: {e})",
                  file=sys.stderr)
            continue
        strategy = parts[1] if len(parts) == 4 else "*"
        found.setdefault((strategy, int(parts[-2][1:])), {})[int(parts[0][1:])] = point
    return found


def area_under(points: list[tuple[float, float]]) -> float:
    """Trapezoid area under accuracy over labeled count, divided by the count range: the mean
    accuracy over the budget (the accuracy itself for a single point)."""
    if len(points) == 1:
        return points[0][1]
    xs, ys = zip(*sorted(points))
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0]) if xs[-1] > xs[0] else statistics.mean(ys)


def al_table(results_dir: str) -> tuple[str, str]:
    """(markdown, csv) of al.sh's runs: final test accuracy per (strategy, round, labeled count),
    mean ± std over seeds, and per strategy the area under the accuracy curve of each seed whose
    rounds are all there (round 0 is every strategy's own)."""
    found = al_results(results_dir)
    if not found:
        raise ValueError(f"no al.sh results under {results_dir} (looked for "
                         f"{os.path.join(results_dir, 'sSEED', 'r0', 'result.json')} and "
                         f"sSEED/STRATEGY/rR/result.json); give al.sh's OUT_DIR")
    strategies = sorted({s for s, _ in found if s != "*"}) or ["*"]  # "*": round 0 only so far
    rounds = sorted({r for _, r in found})
    if rounds[0] != 0:
        print(f"warning: no round 0 under {results_dir}: no area under the curve", file=sys.stderr)
    csv_lines = ["strategy,round,labeled,seeds,mean_acc,std_acc,accs"]
    cells, aucs = {}, {}
    for st in strategies:
        per_seed: dict[int, list] = {}
        for r in rounds:
            runs = found.get(("*" if r == 0 else st, r), {})
            for seed, pt in runs.items():
                per_seed.setdefault(seed, []).append(pt)
            if runs:
                accs = [a for _, a in runs.values()]
                n_lab = statistics.mean(n for n, _ in runs.values())
                cells[st, r] = (n_lab, accs)
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                csv_lines.append(f"{st},{r},{n_lab:g},{len(accs)},{statistics.mean(accs):.4f},"
                                 f"{sd:.4f},{' '.join(f'{a:.2f}' for a in accs)}")
        every = len(rounds) == rounds[-1] + 1  # rounds 0..R all there
        aucs[st] = [area_under(pts) for pts in per_seed.values() if every and len(pts) == len(rounds)]
    labeled = {r: statistics.mean(n for (_, r2), runs in found.items() if r2 == r
                                  for n, _ in runs.values()) for r in rounds}
    head = " | ".join(f"round {r} ({labeled[r]:g} labels)" for r in rounds)
    lines = [f"| strategy | {head} | area under curve |", "|---|" + "---|" * (len(rounds) + 1)]
    for st in strategies:
        row = [format_cell(cells[st, r][1]) if (st, r) in cells else "not run" for r in rounds]
        lines.append(f"| {st} | " + " | ".join(row) + f" | {format_cell(aucs[st])} |")
    for st in strategies:
        if aucs[st]:
            csv_lines.append(f"{st},auc,,{len(aucs[st])},{statistics.mean(aucs[st]):.4f},"
                             f"{statistics.stdev(aucs[st]) if len(aucs[st]) > 1 else 0.0:.4f},"
                             f"{' '.join(f'{a:.2f}' for a in aucs[st])}")
    md = "\n".join(lines) + ("\n\nFinal EMA test accuracy (%), mean ± std over seeds; round 0 is "
                             "the same runs for every strategy. Area under curve: the trapezoid "
                             "area under accuracy over labeled count divided by the count range "
                             "(= mean accuracy over the budget), per seed with every round.\n")
    return md, "\n".join(csv_lines) + "\n"


# ---------------------------------------------------------------- plots (matplotlib: optional)

PLOT_IGNORE = {"out", "data_dir", "device", "log_every", "eval_every", "save_every", "compile",
               "eval_batch_size", "tensorboard", "amp", "debug_nan_step", "skip_nonfinite"}


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("evaluate.py: error: plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def read_run(run_dir: str) -> tuple[dict, list[dict]]:
    """(args, metrics lines) of a run directory, from result.json or the checkpoint."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise SystemExit(f"evaluate.py: error: {run_dir} is not a run directory (no metrics.jsonl)")
    lines = []
    with open(metrics) as fh:
        for line in fh:
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a torn last line of an interrupted run
    try:
        with open(os.path.join(run_dir, "result.json")) as fh:
            args = json.load(fh)["args"]
    except (OSError, ValueError, KeyError):
        try:
            args = read_checkpoint(run_dir)[0]["args"]
        except CheckpointError as e:
            raise SystemExit(f"evaluate.py: error: {run_dir}: no result.json and {e}") from None
    return args, lines


def run_labels(all_args: list[dict]) -> list[str]:
    """The method (with beta for entropy), then the settings that differ between the plotted
    runs of the same method (seed included)."""
    out = []
    for a in all_args:
        same = [b for b in all_args if b["loss"] == a["loss"]]
        keys = sorted({k for b in same for k in b} - PLOT_IGNORE - {"loss"})
        differ = [k for k in keys if len({repr(b.get(k)) for b in same}) > 1]
        extra = [f"{k}={a.get(k)}" for k in differ]
        if a["loss"] == "entropy" and "entropy_ratio" not in differ:
            extra.insert(0, f"beta={a.get('entropy_ratio')}")
        out.append(" ".join([a["loss"]] + extra))
    return out


PANELS = [  # title, y label, [(metrics field, line style, legend suffix)]
    ("EMA test accuracy", "accuracy", [("test_acc", "-", "")]),
    ("Unlabeled samples per group", "fraction of the unlabeled batch",
     [("confident", "-", "confident"), ("entropy_selected", "--", "entropy-selected"),
      ("unconfident", ":", "unconfident")]),
    ("Pseudo-label accuracy", "accuracy against the true labels",
     [("pl_acc_confident", "-", "confident"), ("pl_acc_selected", "--", "entropy-selected")]),
    ("Mean unlabeled weight", "weight", [("mean_weight", "-", "")]),
]


def plot_runs(run_dirs: list[str], out: str) -> None:
    """One figure: the PANELS over epochs, one colour per run, one line style per group."""
    plt = import_pyplot()
    runs = [read_run(d) for d in run_dirs]
    labels = run_labels([a for a, _ in runs])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, fields) in zip(axes.flat, PANELS):
        for i, (_, lines) in enumerate(runs):
            for field, style, _ in fields:
                pts = [(m["epoch"], m[field]) for m in lines if m.get(field) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, color=colours[i % len(colours)], marker=".", ms=3)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(fields) > 1:  # line style = group, explained once per panel in black
            ax.legend([plt.Line2D([], [], color="k", ls=s) for _, s, _ in fields],
                      [name for _, _, name in fields], fontsize=8, loc="best")
        if not ax.lines:
            ax.text(0.5, 0.5, "no data (e.g. --mu 0)", ha="center", va="center",
                    transform=ax.transAxes)
    handles = [plt.Line2D([], [], color=colours[i % len(colours)]) for i in range(len(runs))]
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(runs)), fontsize=8)
    fig.suptitle(", ".join(sorted({str(a.get("dataset")) for a, _ in runs})))
    save_figure(fig, out)


def save_figure(fig, out: str) -> None:
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    print(f"wrote {out}")


def row_normalised(cm):
    cm = np.asarray(cm, dtype=np.float64)
    return cm / np.maximum(cm.sum(1, keepdims=True), 1)


def plot_confusion(run_dir: str, out: str, data_dir: str | None, device: str) -> None:
    """Test-set confusion of the EMA model, and the pseudo-label confusion (confident and
    entropy-selected samples) of the last evaluation interval, row-normalised."""
    plt = import_pyplot()
    r = evaluate_checkpoint(run_dir, per_class=True, data_dir=data_dir, device=device)
    k = len(r["classes"])
    mats = [("test set (EMA model)", r["confusion"])]
    pl_path = os.path.join(run_dir, "pl_confusion.npy")
    if os.path.isfile(pl_path):
        pl = np.load(pl_path)
        mats.append((f"pseudo-labels, last interval ({int(pl[:2].sum())} samples)", pl[:2].sum(0)))
    fig, axes = plt.subplots(1, len(mats), figsize=(6 * len(mats), 5.5), constrained_layout=True,
                             squeeze=False)
    for ax, (title, cm) in zip(axes[0], mats):
        im = ax.imshow(row_normalised(cm), vmin=0, vmax=1, cmap="Blues")
        ax.set(title=title, xlabel="assigned / predicted class", ylabel="true class")
        if k <= 20:
            ax.set_xticks(range(k), r["classes"], rotation=90, fontsize=7)
            ax.set_yticks(range(k), r["classes"], fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    save_figure(fig, out)


def pl_precision_recall(pl: np.ndarray) -> tuple[list, list]:
    """Per class, from a (3, K, K) pseudo-label confusion: precision = right / given the class
    (confident or entropy-selected), recall = right / unlabeled samples of that class seen."""
    given = pl[:2].sum(0)
    right = np.diagonal(given)
    seen = pl.sum(0).sum(1)
    prec = [right[k] / given[:, k].sum() if given[:, k].sum() else None for k in range(len(right))]
    rec = [right[k] / seen[k] if seen[k] else None for k in range(len(right))]
    return prec, rec


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", nargs="?", help="a run directory (OUT/) or a checkpoint file")
    p.add_argument("--per-class", action="store_true", help="also print per-class accuracy")
    p.add_argument("--data-dir", default=None,
                   help="where the dataset is, if it moved since training (default: the run's)")
    p.add_argument("--dataset", default=None,
                   help="the run's dataset at a new place, e.g. npz:/new/path.npz (default: the run's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to evaluate on (default: cuda if available, else cpu)")
    p.add_argument("--table", metavar="RESULTS_DIR",
                   help="write RESULTS_DIR/table1.md from every result.json below it and print it")
    p.add_argument("--lt-table", metavar="RESULTS_DIR",
                   help="write RESULTS_DIR/lt_table.md for the long-tailed runs below it and print it")
    p.add_argument("--al-table", metavar="RESULTS_DIR",
                   help="write RESULTS_DIR/al_table.md and al_table.csv for al.sh's rounds below "
                        "it and print the table")
    p.add_argument("--plot", nargs="+", metavar="RUN",
                   help="plot accuracy, group fractions, pseudo-label accuracy and mean weight of "
                        "these runs over epochs into --out (needs matplotlib)")
    p.add_argument("--plot-confusion", metavar="RUN",
                   help="plot the test-set and the pseudo-label confusion matrices of RUN into --out")
    p.add_argument("--out", metavar="FIG.png", help="figure file for --plot / --plot-confusion")
    args = p.parse_args(argv)
    if args.plot or args.plot_confusion:
        if not args.out:
            p.error("--plot and --plot-confusion need --out FIG.png")
        for d in (args.plot or []) + ([args.plot_confusion] if args.plot_confusion else []):
            if not os.path.isdir(d):
                p.error(f"{d} is not a run directory")
        if args.plot:
            plot_runs(args.plot, args.out)
        else:
            try:
                plot_confusion(args.plot_confusion, args.out, args.data_dir, args.device)
            except (CheckpointError, ValueError, RuntimeError) as e:
                sys.exit(f"evaluate.py: error: {e}")
        return
    if args.al_table:
        if not os.path.isdir(args.al_table):
            p.error(f"{args.al_table} is not a directory")
        try:
            md, csv_text = al_table(args.al_table)
        except ValueError as e:
            sys.exit(f"evaluate.py: error: {e}")
        write_text(os.path.join(args.al_table, "al_table.csv"), csv_text, echo=False)
        write_text(os.path.join(args.al_table, "al_table.md"), md)
        return
    tables = ((args.table, table1, "table1.md"), (args.lt_table, lt_table, "lt_table.md"))
    for folder, make, name in tables:
        if folder:
            if not os.path.isdir(folder):
                p.error(f"{folder} is not a directory")
            write_text(os.path.join(folder, name), make(folder))
            return
    if not args.path:
        p.error("give a run directory or checkpoint file, or --table RESULTS_DIR")
    try:
        r = evaluate_checkpoint(args.path, args.per_class, args.data_dir, args.device, args.dataset)
    except (CheckpointError, ValueError, RuntimeError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    print(f"{r['checkpoint']} (step {r['step']}): top-1 accuracy {100 * r['top1']:.2f} % on the "
          f"{r['n_test']} test images of {r['dataset']}")
    if args.per_class:
        print_per_class(r, args.path)


def write_text(path: str, text: str, echo: bool = True) -> None:
    """Write atomically (a temporary file, then a rename) and print."""
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)
    if echo:
        print(text)


def print_per_class(r: dict, path: str) -> None:
    """Per-class test accuracy with names and counts; the pseudo-label precision and recall of
    the last evaluation interval when the run directory holds pl_confusion.npy."""
    pl_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "pl_confusion.npy")
    prec = rec = None
    if os.path.isfile(pl_path):
        prec, rec = pl_precision_recall(np.load(pl_path))
    fmt = lambda v: "     -" if v is None else f"{100 * v:6.2f}"  # noqa: E731
    print(f"  {'class':>16s}  {'test acc':>8s}  {'n':>5s}" +
          ("  pseudo-label precision / recall (last interval)" if prec else ""))
    for c, name in enumerate(r["classes"]):
        line = (f"  {name:>16s}  {fmt(r['per_class'].get(name))} %  "
                f"{r['per_class_count'][name]:5d}")
        if prec:
            line += f"  {fmt(prec[c])} % / {fmt(rec[c])} %"
        print(line)
    m = r["metrics"]
    groups = class_groups(r["labeled_counts"])
    print(f"  head / medium / tail classes by labeled count ({len(groups['head'])} / "
          f"{len(groups['medium'])} / {len(groups['tail'])}):")
    for suffix, what in (("", "raw"), ("_adjusted", "logit-adjusted")):
        print(f"    {what:>15s}: overall {fmt(m['test_acc' + suffix])} %, head "
              f"{fmt(m['head_acc' + suffix])} %, medium {fmt(m['medium_acc' + suffix])} %, tail "
              f"{fmt(m['tail_acc' + suffix])} %")


if __name__ == "__main__":
    main()
