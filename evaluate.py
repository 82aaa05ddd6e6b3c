"""Accuracy of a trained run or checkpoint (EMA model, float32), and the command line of the tables
and plots over runs (report.py).

    python evaluate.py runs/cifar10_4_entropy_s0            # top-1 of the EMA model
    python evaluate.py runs/.../last.pt --per-class         # plus per-class accuracy
    python evaluate.py --table runs                         # Table 1 markdown (writes table1.md)
    python evaluate.py --al-table results_al                # active learning rounds of al.sh
"""
import argparse
import os
import sys

import numpy as np
import torch

from checkpoint import (CheckpointError, DirLock, read_checkpoint,  # noqa: F401 (re-exported)
                        remove_stale_temps, write_text)


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


def val_metrics(model: torch.nn.Module, x_u8: torch.Tensor, y: torch.Tensor, normalize,
                batch_size: int = 1024) -> dict:
    """{"val_acc": top-1 on the validation images} (--val-per-class), or {} when there are none."""
    if not len(y):
        return {}
    pred = scores_all(model, x_u8, normalize, batch_size).argmax(1)
    return {"val_acc": (pred == y).double().mean().item()}


def class_groups(labeled_counts: list[int]) -> dict[str, list[int]]:
    """Head / medium / tail classes (docs/long_tailed.md): classes sorted by labeled count, most
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
    """Overall, per-class and head / medium / tail accuracy, raw and logit-adjusted (docs/long_tailed.md:
    long-tailed).
    On a balanced test set the overall accuracy is the balanced accuracy. With tau > 0 and a class
    that has no labeled image (prior 0, -log pi = +inf) the adjusted prediction is that class for
    every image: the adjusted accuracies are undefined and reported as None (null)."""
    k = scores.shape[1]
    prior = torch.tensor(labeled_counts, dtype=torch.float64) / max(sum(labeled_counts), 1)
    out = {}
    for suffix, pred in (("", scores.argmax(1)), ("_adjusted", logit_adjusted(scores, prior, tau))):
        if suffix and tau > 0 and min(labeled_counts) == 0:
            out.update({"test_acc_adjusted": None, "per_class_acc_adjusted": [None] * k,
                        **{f"{g}_acc_adjusted": None for g in ("head", "medium", "tail")}})
            continue
        right = (pred == y).double().cpu()
        per = [right[(y == c).cpu()].mean().item() if (y == c).any() else None for c in range(k)]
        out[f"test_acc{suffix}"] = right.mean().item()
        out[f"per_class_acc{suffix}"] = per
        for g, members in class_groups(labeled_counts).items():
            vals = [per[c] for c in members if per[c] is not None]
            out[f"{g}_acc{suffix}"] = sum(vals) / len(vals) if vals else None
    return out


@torch.no_grad()
def head1_metrics(model: torch.nn.Module, h: torch.Tensor, y: torch.Tensor,
                  labeled_counts: list[int], tau: float = 1.0) -> dict:
    """SeMi (a balanced-head model): the accuracy of head 1, the ordinary classifier, beside head
    2's, which predicts; {} for every other model."""
    if getattr(model, "classifier_b", None) is None:
        return {}
    m = eval_metrics(model.classifier(h.float()).float(), y, labeled_counts, tau)
    return {f"{k}_head1": m[k] for k in ("test_acc", "head_acc", "medium_acc", "tail_acc",
                                         "test_acc_adjusted", "tail_acc_adjusted")}


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
    for prefix in ("npz:", "folder:"):
        if name.startswith(prefix):
            name = prefix + here_or_there(name[len(prefix):])
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
                    variant=a.get("wrn_variant", "tf"),
                    in_channels=state["ema"]["backbone.stem.weight"].shape[1],
                    balanced=any(k.startswith("classifier_b.") for k in state["ema"])).to(device)
    model.load_state_dict(state["ema"])
    return model


def check_run_data(state: dict, ds: dict, name: str, f: str, split: str, strict: bool) -> None:
    """The dataset given for a run's checkpoint must have the channel count the network takes,
    and (for checkpoints that keep data.fingerprint) the same images and labels in `split`: an
    error if strict (query.py indexes the training images), else a warning (evaluate.py may be
    pointed at other test images on purpose)."""
    import data
    stem = state["ema"].get("backbone.stem.weight")
    c_ckpt, c_data = (stem.shape[1] if stem is not None else None), ds["x_test"].shape[-1]
    if c_ckpt not in (None, c_data):
        raise ValueError(f"{name} has {c_data}-channel images but the run in {f} was trained on "
                         f"{c_ckpt}-channel ones; pass the run's dataset with --dataset")
    then = state.get("data", {}).get("digest", {}).get(split)
    if then is not None and then != data.fingerprint(ds, (split,))["digest"].get(split):
        msg = f"{name}: its {split} images or labels are not the ones the run in {f} had"
        if strict:
            raise ValueError(f"{msg}; pass the run's own dataset with --dataset / --data-dir")
        print(f"warning: {msg} (evaluating on them anyway)", file=sys.stderr)


def evaluate_checkpoint(path: str, per_class: bool = False, data_dir: str | None = None,
                        device: str = "cpu", dataset: str | None = None) -> dict:
    import data
    state, f = read_checkpoint(path)
    a = state["args"]
    name, ddir = resolve_dataset(a, state, dataset, data_dir)
    ds = data.load_dataset(name, ddir, a.get("image_size"))
    k_ckpt = len(state.get("classes") or []) or None
    if k_ckpt is not None and k_ckpt != ds["num_classes"]:
        raise ValueError(f"{name} has {ds['num_classes']} classes but the run in {f} was trained "
                         f"on {k_ckpt}; pass the run's dataset with --dataset / --data-dir")
    check_run_data(state, ds, name, f, "test", strict=False)
    model = load_run_model(state, ds["num_classes"], device)
    x = data.to_tensor_images(ds["x_test"], device)
    y = torch.from_numpy(ds["y_test"]).to(device)
    if state["labeled_idx"].numel() and int(state["labeled_idx"].max()) >= len(ds["y_train"]):
        raise ValueError(f"{name} has {len(ds['y_train'])} training images, fewer than the run in "
                         f"{f} was trained on (labeled index {int(state['labeled_idx'].max())}); "
                         f"pass the run's dataset with --dataset / --data-dir")
    norm = data.Normalize(state["mean"], state["std"], device)
    scores, _, h = outputs_all(model, x, norm)
    if not classifier_run(state):
        scores = scores / a.get("pl_temp", 0.1)  # cos / T_pl, Eq. (4)
    pred = scores.argmax(1)
    counts = np.bincount(ds["y_train"][state["labeled_idx"].numpy()], minlength=ds["num_classes"])
    tau = a.get("logit_adjust", 1.0)
    out = {"checkpoint": f, "step": state["step"], "top1": (pred == y).float().mean().item(),
           "dataset": name, "n_test": len(y), "labeled_counts": counts.tolist(),
           "metrics": eval_metrics(scores, y, counts.tolist(), tau)
           | head1_metrics(model, h, y, counts.tolist(), tau)}
    if per_class:
        k = ds["num_classes"]
        out["classes"] = list(ds["classes"])
        out["confusion"] = torch.zeros(k * k, dtype=torch.long).index_add_(
            0, (y * k + pred).cpu(), torch.ones(len(y), dtype=torch.long)).view(k, k).numpy()
        out["per_class"] = {ds["classes"][c]: (pred[y == c] == c).float().mean().item()
                            for c in range(k) if (y == c).any()}
        out["per_class_count"] = {ds["classes"][c]: int((y == c).sum()) for c in range(k)}
    return out


def main(argv=None) -> None:
    import report  # the tables and plots (it imports this module)
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
    p.add_argument("--table-acc", choices=["final", "at-best-val"], default="final",
                   help="--table cells: the final test accuracy (the paper's), or the test "
                        "accuracy at the evaluation with the best validation accuracy (runs "
                        "with --val-per-class)")
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
        try:
            report.check_figure_path(args.out)
            if args.plot:
                report.plot_runs(args.plot, args.out)
            else:
                report.plot_confusion(args.plot_confusion, args.out, args.data_dir, args.device,
                                      args.dataset)
        except (CheckpointError, ValueError, RuntimeError, KeyError) as e:
            sys.exit(f"evaluate.py: error: {str(e).strip(chr(39))}")
        return
    table1 = lambda d: report.table1(d, args.table_acc)  # noqa: E731
    tables = ((args.table, table1, "table1.md"), (args.lt_table, report.lt_table, "lt_table.md"),
              (args.al_table, report.al_table, "al_table.md"))
    for folder, make, name in tables:
        if folder:
            if not os.path.isdir(folder):
                p.error(f"{folder} is not a directory")
            try:
                with DirLock(folder, "evaluate.py"):
                    write_table(folder, name, make(folder))
            except ValueError as e:
                sys.exit(f"evaluate.py: error: {e}")
            except OSError as e:
                sys.exit(f"evaluate.py: error: cannot write {os.path.join(folder, name)}: "
                         f"{e.strerror or e}; give a writable folder (or copy the runs to one)")
            return
    if not args.path:
        p.error("give a run directory or checkpoint file, or --table RESULTS_DIR")
    try:
        r = evaluate_checkpoint(args.path, args.per_class, args.data_dir, args.device, args.dataset)
    except (CheckpointError, ValueError, RuntimeError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    except KeyError as e:
        sys.exit(f"evaluate.py: error: {args.path} is not a checkpoint of train.py (no {e} in it)")
    print(f"{r['checkpoint']} (step {r['step']}): top-1 accuracy {100 * r['top1']:.2f} % on the "
          f"{r['n_test']} test images of {r['dataset']}")
    if args.per_class:
        print_per_class(r, args.path)


def write_table(folder: str, name: str, made) -> None:
    """FOLDER/NAME (and al_table.csv beside al_table.md), printed; temporary files that a killed
    writer left are removed first (the caller holds the folder's lock)."""
    md, csv_text = made if isinstance(made, tuple) else (made, None)
    path = os.path.join(folder, name)
    remove_stale_temps(path)
    if csv_text is not None:
        remove_stale_temps(path[:-3] + ".csv")
        write_text(path[:-3] + ".csv", csv_text, echo=False)
    write_text(path, md, echo=True)


def print_per_class(r: dict, path: str) -> None:
    import report
    """Per-class test accuracy with names and counts; the pseudo-label precision and recall of
    the last evaluation interval when the run directory holds pl_confusion.npy."""
    pl_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "pl_confusion.npy")
    prec = rec = None
    if os.path.isfile(pl_path):
        prec, rec = report.pl_precision_recall(np.load(pl_path))
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
