"""What a run logs: progress lines, metrics.jsonl, TensorBoard, pl_confusion.npy, result.json.

The training step accumulates its statistics on the device (`Run.stats`, a float64 vector in the
order of STATS); they are read back to the host only here, at logging and evaluation time.
What each field means: docs/outputs.md.
"""
import argparse
import json
import os
import platform
import statistics
import sys

import numpy as np
import torch

import checkpoint
import methods

STATS = ("loss_sum", "steps") + methods.DIAG  # the order of Run.stats (saved in checkpoints)
HIDDEN_ARGS = ("debug_nan_step", "out_created")  # test-only fault injection, bookkeeping


def named(stats: torch.Tensor) -> dict:
    """The accumulated statistics by name (one host sync)."""
    return dict(zip(STATS, stats.tolist()))


def public_args(args: argparse.Namespace) -> dict:
    """The arguments saved with a run; a flag added later is left out at the value that older
    runs had (checkpoint.OLD_DEFAULTS: e.g. flip is written only when it is off), and SeMi's
    flags where they do not apply (None), so that every other configuration records exactly
    what it did before they existed (a missing key reads as it in the resume check)."""
    return {k: v for k, v in vars(args).items() if k not in HIDDEN_ARGS
            and not (k in checkpoint.OLD_DEFAULTS and v == checkpoint.OLD_DEFAULTS[k])
            and not (k in methods.SEMI_FLAGS and v is None)}


# ---------------------------------------------------------------- metrics.jsonl

def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(checkpoint.dumps_json(record) + "\n")


def truncate_metrics(path: str, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as fh:
        for line in fh:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                pass  # a line torn by a crash during the append: dropped, logged again
    checkpoint.write_text(path, "".join(keep))


def per_class_pl(confusion: torch.Tensor) -> dict:
    """Per assigned class: how many unlabeled samples got it as their pseudo-label (confident /
    entropy-selected) over the interval, and how many of those were right."""
    c = confusion.round().long().cpu()
    return {"assigned_confident": c[0].sum(0).tolist(), "correct_confident": c[0].diagonal().tolist(),
            "assigned_selected": c[1].sum(0).tolist(), "correct_selected": c[1].diagonal().tolist()}


def write_confusion(out: str, confusion: torch.Tensor) -> None:
    """OUT/pl_confusion.npy: (3, K, K) int64 counts (confident, entropy-selected, unconfident) x
    true class x argmax class of the last evaluation interval; written atomically."""
    counts = confusion.round().long().cpu().numpy()
    checkpoint.atomic_write(os.path.join(out, "pl_confusion.npy"), lambda fh: np.save(fh, counts))


def epoch_metrics(run, test: dict, lr: float) -> dict:
    """One metrics.jsonl line: the step, the optimizer's lr, the test metrics and the pseudo-label
    diagnostics of the interval since the last evaluation."""
    s = named(run.stats)
    n_ulb, conf, sel = s["n_ulb"], s["confident"], s["entropy_selected"]
    simmatch = run.args.loss == "simmatch" and n_ulb
    return {"step": run.step, "epoch": run.step / run.args.steps_per_epoch,
            "lr": lr, "loss": s["loss_sum"] / max(s["steps"], 1),
            **test, "confident": conf / max(n_ulb, 1), "entropy_selected": sel / max(n_ulb, 1),
            "unconfident": s["unconfident"] / max(n_ulb, 1),
            "pl_acc_confident": s["correct_confident"] / conf if conf else None,
            "pl_acc_selected": s["correct_selected"] / sel if sel else None,
            "mean_weight": s["weight_sum"] / n_ulb if n_ulb else None,
            # SimMatch: how often argmax p_hat and argmax of the aligned p_w were right
            "pl_acc_p_hat": s["correct_p_hat"] / n_ulb if simmatch else None,
            "pl_acc_p_w": s["correct_p_w"] / n_ulb if simmatch else None,
            "elapsed_s": round(run.elapsed, 1), "pl_per_class": per_class_pl(run.pl_confusion),
            # SeMi: OHEML weight histograms of the interval (its state resets them)
            **(run.method_state.metrics() if hasattr(run.method_state, "metrics") else {}),
            **known_label_pl(run)}


def known_label_pl(run) -> dict:
    """With images that have no label (x_unlabeled, folder:PATH/unlabeled), the pseudo-label
    accuracies are over the unlabeled-batch images that do have one (the confusion counts only
    those), and pl_labeled_fraction says what share of the unlabeled batches that was. Nothing
    for data whose images all have labels (every field as before)."""
    if not getattr(run, "n_no_label", 0):
        return {}
    c = run.pl_confusion.double().cpu()
    n_ulb = named(run.stats)["n_ulb"]
    ok = lambda g: c[g].trace().item() / c[g].sum().item() if c[g].sum() else None  # noqa: E731
    out = {"pl_acc_confident": ok(0), "pl_acc_selected": ok(1),
           "pl_labeled_fraction": c.sum().item() / n_ulb if n_ulb else None}
    if run.args.loss == "simmatch" and c.sum():  # counted over all; only labeled ones can be right
        s = named(run.stats)
        out.update(pl_acc_p_hat=s["correct_p_hat"] / c.sum().item(),
                   pl_acc_p_w=s["correct_p_w"] / c.sum().item())
    return out


def record(run, m: dict) -> bool:
    """Append an evaluation to the test (and validation) history; True when its validation
    accuracy is the best so far (ties: the later evaluation), i.e. best_val.pt is to be kept."""
    run.history.append(m["test_acc"])
    if "val_acc" not in m:
        return False
    run.val_history.append(m["val_acc"])
    return m["val_acc"] >= max(run.val_history)


# ---------------------------------------------------------------- printed lines

def start_line(run, ipb: int) -> str:
    a = run.args
    amp = str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "off"
    entropy = (f" (beta {a.entropy_ratio}, {a.entropy_weighting} weighting, first "
               f"{a.entropy_epochs} epochs, {a.pair_weight} pair weight)" if a.loss == "entropy" else "")
    own = (f" ({run.n_no_label} without labels)" if getattr(run, "n_no_label", 0) else "")
    own += f", {len(run.val_idx)} validation" if len(getattr(run, "val_idx", ())) else ""
    own += "" if getattr(a, "flip", True) else ", no flips"
    return (f"{a.dataset}: {len(run.x_train)} train{own} / {len(run.x_test)} test images, {run.k} "
            f"classes, {len(run.lb)} labeled | loss {a.loss}{entropy} | {a.arch} (BN momentum "
            f"{a.bn_momentum:g}) on {device_name(run.dev)}, amp {amp} | "
            f"{run.total} steps x {ipb} images -> {a.out}")


def progress_line(run, lr: float, rate: float, ipb: int) -> str:
    s = named(run.stats)
    n_ulb = max(s["n_ulb"], 1)
    return (f"step {run.step}/{run.total} loss {s['loss_sum'] / max(s['steps'], 1):.4f} "
            f"lr {lr:.4f} conf {s['confident'] / n_ulb:.3f} "
            f"sel {s['entropy_selected'] / n_ulb:.3f} unconf {s['unconfident'] / n_ulb:.3f} | "
            f"{rate * ipb:.0f} img/s ETA {(run.total - run.step) / max(rate, 1e-9) / 60:.1f} min")


def train_scalars(run, img_s: float) -> dict:
    """The TensorBoard scalars of a progress line."""
    s = named(run.stats)
    return {"loss": s["loss_sum"] / max(s["steps"], 1), "img_s": img_s, "lr": run.lr()}


def eval_line(m: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    w = "-" if m["mean_weight"] is None else format(m["mean_weight"], ".3f")
    val = f", validation {100 * m['val_acc']:.2f} %" if "val_acc" in m else ""
    known = (f" (over the {pct(m['pl_labeled_fraction'])} of unlabeled images that have a label)"
             if m.get("pl_labeled_fraction") is not None else "")
    return (f"epoch {m['epoch']:.2f}: test acc {100 * m['test_acc']:.2f} % (EMA){val} | pseudo-label "
            f"accuracy: confident {pct(m['pl_acc_confident'])}, entropy-selected "
            f"{pct(m['pl_acc_selected'])}{known} | mean unlabeled weight {w}")


def warn_unlabeled_classes(classes: list, labeled_counts: list) -> None:
    """Classes without a labeled image are allowed (e.g. an active-learning start), but worth
    knowing."""
    missing = [classes[c] for c, n in enumerate(labeled_counts) if n == 0]
    if missing:
        print(f"warning: {len(missing)} of {len(classes)} classes have no labeled image: "
              f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}", file=sys.stderr)


# ---------------------------------------------------------------- TensorBoard

class Board:
    """TensorBoard scalars in OUT/tb, or nothing at all when off (so the loop has no branches).
    On resume, points logged after the checkpoint's step are purged (they are logged again), so no
    step appears twice."""

    def __init__(self, out: str, step: int, on: bool):
        self.tb = None
        if on:
            from torch.utils.tensorboard import SummaryWriter  # optional extra
            self.tb = SummaryWriter(os.path.join(out, "tb"), purge_step=step + 1 if step > 0 else None)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.tb is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------- result.json

def versions() -> dict:
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_result(run) -> dict:
    h = run.history
    res = {"final_acc": h[-1], "median_last20_acc": statistics.median(h[-20:]), "best_acc": max(h),
           "final": run.last_test, "labeled_counts": run.labeled_counts, "evaluations": len(h),
           "steps": run.step, "wall_time_s": round(run.elapsed, 1),
           "device": device_name(run.dev), "versions": versions(), "args": public_args(run.args)}
    res.update(validation_result(run))
    checkpoint.write_text(os.path.join(run.args.out, "result.json"), checkpoint.dumps_json(res, indent=1))
    return res


def validation_result(run) -> dict:
    """--val-per-class: the final and best validation accuracy and the test accuracy of the
    evaluation with the best validation accuracy (the latest one among ties: the checkpoint
    best_val.pt). Whether the weak augmentation flipped: args.flip (written when off)."""
    out, v = {}, run.val_history
    if v:
        best = max(i for i in range(len(v)) if v[i] == max(v))
        out.update(val_acc=v[-1], best_val_acc=v[best], test_acc_at_best_val=run.history[best],
                   best_val_evaluation=best + 1, val_per_class=run.args.val_per_class,
                   val_images=len(run.val_idx))
    return out


def done_line(res: dict, out: str) -> str:
    val = (f", at the best validation ({100 * res['best_val_acc']:.2f} %) "
           f"{100 * res['test_acc_at_best_val']:.2f} %" if "best_val_acc" in res else "")
    return (f"done: final {100 * res['final_acc']:.2f} %, median of last 20 "
            f"{100 * res['median_last20_acc']:.2f} %, best {100 * res['best_acc']:.2f} %{val} "
            f"-> {out}/result.json")
