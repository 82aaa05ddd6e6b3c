"""Tables and plots over runs: Table 1 (and the peers beside it), the long-tailed table, the
active-learning table of al.sh, and the figures. Run through evaluate.py:

    python evaluate.py --table runs                # Table 1 markdown (writes runs/table1.md)
    python evaluate.py --lt-table results_lt       # long-tailed runs (docs/long_tailed.md)
    python evaluate.py --al-table results_al       # active-learning rounds (docs/active_learning.md)
    python evaluate.py --plot RUN ... --out f.png  # curves over epochs (needs matplotlib)
"""
import glob
import json
import os
import statistics
import sys

import numpy as np

from checkpoint import OLD_DEFAULTS, CheckpointError, atomic_write, read_checkpoint
PAPER = {  # [N&O] Table 1, top-1 test accuracy (%), WRN-28-2
    ("cifar10", 4): (94.41, 94.59), ("cifar10", 25): (94.71, 94.55),
    ("cifar100", 4): (45.13, 46.39), ("cifar100", 25): (64.44, 64.97),
}


# ---------------------------------------------------------------- tables

# Settings that do not change what is measured: runs that differ only in these (and the seed)
# are seeds of one experiment. Every other setting, including flags added later, separates rows.
NOT_CONFIG = {"seed", "out", "data_dir", "device", "log_every", "eval_every", "save_every",
              "compile", "eval_batch_size", "tensorboard", "amp", "channels_last",
              "skip_nonfinite", "debug_nan_step", "out_created", "data_device"}
# the protocol of [N&O] Table 1 (docs/method.md); a run at another setting of these is its own row
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
    """The configuration of a run's arguments. A flag at None, or at the value that a run from
    before the flag existed had (OLD_DEFAULTS), is left out: that is how such a run reads it, so
    the two stay seeds of one experiment."""
    return tuple(sorted((k, repr(v)) for k, v in a.items() if k not in NOT_CONFIG and v is not None
                        and not (k in OLD_DEFAULTS and v == OLD_DEFAULTS[k])))


def read_results(results_dir: str) -> list[tuple[str, dict]]:
    """(file, record) of every readable result.json below results_dir, each configuration and
    seed once: a copy of a run (same configuration and seed, e.g. cp -r r r_backup) is one run,
    counted once with a warning. Unreadable ones are skipped with a warning (once)."""
    found, seen = [], {}
    for f in sorted(glob.glob(os.path.join(glob.escape(results_dir), "**", "result.json"),
                              recursive=True)):
        try:
            with open(f) as fh:
                r = json.load(fh)
            a = r["args"]
            float(r["final_acc"]), a["dataset"], a["labels_per_class"], a["loss"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"warning: skipping {f}: unreadable or incomplete ({type(e).__name__}: {e})",
                  file=sys.stderr)
            continue
        key = (config_key(a), repr(a.get("seed")))
        if key in seen:
            print(f"warning: {f} is the same configuration and seed as {seen[key]} (a copy?); "
                  f"counted once", file=sys.stderr)
            continue
        seen[key] = f
        found.append((f, r))
    return found


def collect_results(results_dir: str, field=lambda r: float(r["final_acc"]), records=None) -> dict:
    """{configuration without the seed: (args of one run, [100 x field(result) of each seed])}
    from every readable result.json below results_dir (read_results; or the given records)."""
    groups = {}
    for _, r in read_results(results_dir) if records is None else records:
        acc = field(r)
        groups.setdefault(config_key(r["args"]), (r["args"], []))[1].append(
            None if acc is None else 100.0 * acc)
    return groups


def format_cell(vals: list[float] | None) -> str:
    if vals and all(v is None for v in vals):
        return "undefined"  # e.g. logit-adjusted accuracy with a class that has no labels
    vals = [v for v in vals or [] if v is not None]
    if not vals:
        return "not run"
    if len(vals) == 1:
        return f"{vals[0]:.2f} (1 seed)"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} ({len(vals)} seeds)"


def at_protocol(a: dict) -> bool:
    return all(a.get(k) == v for k, v in PROTOCOL.items())


def differing(a: dict, others: list[dict], protocol: bool = True) -> str:
    """The settings of run a that differ from the paper protocol (with protocol) or from the
    other rows of its cell, as flags."""
    keys = {k for k, v in PROTOCOL.items() if a.get(k) != v} if protocol else set()
    keys |= {k for b in others for k in set(a) | set(b) if k not in NOT_CONFIG
             and a.get(k, OLD_DEFAULTS.get(k)) != b.get(k, OLD_DEFAULTS.get(k))}
    keys.discard("labeled_idx_sha256")  # the file's path says which labeled set
    return " ".join(as_flag(k, a.get(k, OLD_DEFAULTS.get(k))) for k in sorted(keys)) or "-"


def as_flag(key: str, value) -> str:
    """A setting as the command line writes it: --flip / --no-flip for a boolean, --key value
    otherwise (a flag left at its default, e.g. no --val-per-class, says so)."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}" if value is not None else f"{flag} (default)"


TABLE_ACC = {  # --table-acc: which test accuracy a cell reports, and how the table says so
    "final": (lambda r: float(r["final_acc"]), "at the end of training"),
    "at-best-val": (lambda r: r.get("test_acc_at_best_val"),
                    "at the evaluation with the best validation accuracy (runs with a validation "
                    "split only)"),
}


def table1(results_dir: str, acc: str = "final") -> str:
    """Table 1 (paper protocol, one configuration per cell), the peers beside their published
    numbers, and every other configuration or dataset as its own row. acc: the final test
    accuracy (the paper's) or the test accuracy at the best validation evaluation."""
    field, when = TABLE_ACC[acc]
    groups = collect_results(results_dir, field)
    if not groups:
        raise ValueError(f"no result.json under {results_dir}; give the OUT_DIR of run_all.sh "
                         f"(or a folder holding train.py runs)")
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
    lines.append(f"\nTop-1 test accuracy (%) of the EMA model {when}, mean ± std "
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
                 "long-tailed" if a.get("lt_labeled") else f"fold {a['stl10_fold']}"
                 if a.get("stl10_fold") is not None else "--labeled-idx")
        rows.append((a["dataset"], split, a["loss"], differing(a, same), format_cell(vals)))
    lines += [f"| {d} | {n} | {m} | {diff} | {v} |" for d, n, m, diff, v in sorted(rows, key=str)]
    return lines


LT_COLUMNS = [("overall", "test_acc"), ("head", "head_acc"), ("medium", "medium_acc"),
              ("tail", "tail_acc"), ("overall, logit-adjusted", "test_acc_adjusted"),
              ("tail, logit-adjusted", "tail_acc_adjusted")]


def lt_table(results_dir: str) -> str:
    """The long-tailed runs (docs/long_tailed.md): one row per setting and method configuration, final
    accuracies mean ± std over seeds, raw and logit-adjusted, plus FixMatch's median of the
    last 20 evaluations."""
    records = read_results(results_dir)  # read once: each warning once
    cols = {name: collect_results(results_dir, lambda r, k=key: r.get("final", {}).get(k), records)
            for name, key in LT_COLUMNS}
    cols["median of last 20"] = collect_results(results_dir, lambda r: r.get("median_last20_acc"),
                                                records)
    keys = sorted((k for k, (a, _) in cols["overall"].items() if a.get("lt_labeled")),
                  key=lambda k: str(lt_setting(cols["overall"][k][0])))
    if not keys:
        raise ValueError(f"no long-tailed run (result.json of a train.py --lt-labeled run) under "
                         f"{results_dir}; give the OUT_DIR of run_lt.sh")
    head = " | ".join(cols)
    lines = [f"| dataset | N1 / M1 / gamma_l / gamma_u | method | {head} |",
             "|---|---|---|" + "---|" * len(cols)]
    # SeMi: head 2 (balanced) predicts; its head 1 gets a row of its own beside it
    head1 = {name: collect_results(results_dir, lambda r, k=key: r.get("final", {}).get(k + "_head1"),
                                   records) for name, key in LT_COLUMNS}
    for key in keys:
        a = cols["overall"][key][0]
        method = a["loss"] + (f" --hard-weight {a['hard_weight']}" if a.get("hard_weight") else "")
        same = [cols["overall"][k][0] for k in keys if k != key and
                (cols["overall"][k][0]["dataset"], lt_setting(cols["overall"][k][0]),
                 cols["overall"][k][0]["loss"]) == (a["dataset"], lt_setting(a), a["loss"])]
        diff = differing({k: v for k, v in a.items() if k != "hard_weight"},
                         [{k: v for k, v in b.items() if k != "hard_weight"} for b in same], False)
        method += f" {diff}" if same and diff != "-" else ""
        lines.append(f"| {a['dataset']} | {lt_setting(a)} | {method} | "
                     + " | ".join(format_cell(cols[c][key][1]) for c in cols) + " |")
        if a["loss"] == "semi":
            lines.append(f"| {a['dataset']} | {lt_setting(a)} | semi, head 1 | "
                         + " | ".join(format_cell(head1[c][key][1]) if c in head1 else "-"
                                      for c in cols) + " |")
    semi = any(cols["overall"][k][0]["loss"] == "semi" for k in keys)
    return "\n".join(lines) + ("\n\nTop-1 test accuracy (%), balanced test set; head / medium / "
                               "tail = classes by labeled count; mean ± std over seeds; "
                               "logit-adjusted: undefined where a class has no labeled image.\n"
                               + ("semi predicts with its balanced head 2; 'semi, head 1' is its "
                                  "ordinary classifier, for comparison.\n" if semi else ""))


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


NO_DATA = {  # what an empty panel means
    "Pseudo-label accuracy": "no data: no unlabeled sample was confident or entropy-selected\n"
                             "at any evaluation (or --mu 0)",
    "Mean unlabeled weight": "no data (--mu 0: no unlabeled batch)",
}
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
            ax.text(0.5, 0.5, NO_DATA.get(title, "no data"), ha="center", va="center",
                    transform=ax.transAxes)
    handles = [plt.Line2D([], [], color=colours[i % len(colours)]) for i in range(len(runs))]
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(runs)), fontsize=8)
    fig.suptitle(", ".join(sorted({str(a.get("dataset")) for a, _ in runs})))
    save_figure(fig, out)


FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps")


def check_figure_path(out: str) -> str:
    """The format that out's suffix names (written as such), or a ValueError; its folder must
    exist and be writable. Checked before anything is read or drawn."""
    fmt = os.path.splitext(out)[1][1:].lower()
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"--out {out}: the figure format follows the suffix; name it "
                         f"FIG.{', FIG.'.join(FIGURE_FORMATS)}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: the folder {folder} is not writable")
    return fmt


def save_figure(fig, out: str) -> None:
    fmt = check_figure_path(out)
    try:
        atomic_write(out, lambda fh: fig.savefig(fh, dpi=100, format=fmt))
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"wrote {out}")


def row_normalised(cm):
    cm = np.asarray(cm, dtype=np.float64)
    return cm / np.maximum(cm.sum(1, keepdims=True), 1)


def plot_confusion(run_dir: str, out: str, data_dir: str | None, device: str,
                   dataset: str | None = None) -> None:
    """Test-set confusion of the EMA model, and the pseudo-label confusion (confident and
    entropy-selected samples) of the last evaluation interval, row-normalised."""
    plt = import_pyplot()
    from evaluate import evaluate_checkpoint
    r = evaluate_checkpoint(run_dir, per_class=True, data_dir=data_dir, device=device,
                            dataset=dataset)
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
