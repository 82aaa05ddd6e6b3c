"""Accuracy of a trained run, and the Table 1 aggregation over runs.

    python evaluate.py runs/cifar10_4_entropy_s0            # top-1 of the EMA model
    python evaluate.py runs/.../last.pt --per-class         # plus per-class accuracy
    python evaluate.py --table runs                         # Table 1 markdown (writes table1.md)
"""
import argparse
import glob
import json
import os
import statistics
import sys

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
    problems = []
    for f in files:
        try:
            return torch.load(f, map_location="cpu", weights_only=True), f
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or unsafe: all the same to us
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"{f} ({msg[:160]})")
            if len(files) > 1 and f != files[-1]:
                print(f"warning: checkpoint {f} is unreadable ({msg[:160]}); "
                      f"falling back to {files[files.index(f) + 1]}", file=sys.stderr)
    raise CheckpointError("no readable checkpoint: " + "; ".join(problems) +
                          ". It is truncated, corrupt or not a plain-tensor checkpoint; delete it "
                          "to start the run over")


@torch.no_grad()
def predict_all(model: torch.nn.Module, x_u8: torch.Tensor, normalize, batch_size: int = 1024,
                amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Predictions (nearest prototype, or classifier argmax for the peers) for uint8 images
    (N, 3, H, W), model in eval mode."""
    was_training = model.training
    model.eval()
    preds = []
    for i in range(0, len(x_u8), batch_size):
        with torch.autocast(x_u8.device.type, dtype=amp_dtype or torch.bfloat16,
                            enabled=amp_dtype is not None):
            preds.append(model.predict(normalize(x_u8[i:i + batch_size])))
    model.train(was_training)
    return torch.cat(preds)


def accuracy(model, x_u8, y, normalize, batch_size: int = 1024, amp_dtype=None) -> float:
    return (predict_all(model, x_u8, normalize, batch_size, amp_dtype) == y).float().mean().item()


def evaluate_checkpoint(path: str, per_class: bool = False, data_dir: str | None = None,
                        device: str = "cpu") -> dict:
    import data
    from model import Encoder
    state, f = read_checkpoint(path)
    a = state["args"]
    ds = data.load_dataset(a["dataset"], data_dir or a["data_dir"])
    classifier = any(k.startswith("classifier.") for k in state["ema"])  # a peer method's run
    model = Encoder(ds["num_classes"], a["arch"], classifier=classifier).to(device)
    model.load_state_dict(state["ema"])
    x = data.to_tensor_images(ds["x_test"], device)
    y = torch.from_numpy(ds["y_test"]).to(device)
    norm = data.Normalize(state["mean"], state["std"], device)
    pred = predict_all(model, x, norm)
    out = {"checkpoint": f, "step": state["step"], "top1": (pred == y).float().mean().item()}
    if per_class:
        out["per_class"] = {ds["classes"][k]: (pred[y == k] == k).float().mean().item()
                            for k in range(ds["num_classes"]) if (y == k).any()}
    return out


def collect_results(results_dir: str) -> dict:
    """{(dataset, labels_per_class, loss): [final accuracy of each seed, in %]} from result.json files."""
    cells = {}
    for f in sorted(glob.glob(os.path.join(results_dir, "**", "result.json"), recursive=True)):
        with open(f) as fh:
            r = json.load(fh)
        a = r["args"]
        cells.setdefault((a["dataset"], a["labels_per_class"], a["loss"]), []).append(
            100.0 * r["final_acc"])
    return cells


def format_cell(vals: list[float] | None) -> str:
    if not vals:
        return "not run"
    if len(vals) == 1:
        return f"{vals[0]:.2f} (1 seed)"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} ({len(vals)} seeds)"


def table1(results_dir: str) -> str:
    cells = collect_results(results_dir)
    lines = ["| dataset | labels/class | base [G] (paper) | base [G] (ours) | "
             "w.ent [N&O] (paper) | w.ent [N&O] (ours) |",
             "|---|---|---|---|---|---|"]
    for (ds, n), (p_base, p_ent) in PAPER.items():
        name = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[ds]
        lines.append(f"| {name} | {n} | {p_base:.2f} | {format_cell(cells.get((ds, n, 'base')))} | "
                     f"{p_ent:.2f} | {format_cell(cells.get((ds, n, 'entropy')))} |")
    extra = sorted(k for k in cells if (k[0], k[1]) not in PAPER)
    for ds, n, loss in extra:
        lines.append(f"| {ds} | {n} | {loss}: {format_cell(cells[(ds, n, loss)])} | | | |")
    return "\n".join(lines) + ("\n\nTop-1 test accuracy (%) of the EMA model at the end of "
                               "training; mean ± std over seeds.\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", nargs="?", help="a run directory (OUT/) or a checkpoint file")
    p.add_argument("--per-class", action="store_true", help="also print per-class accuracy")
    p.add_argument("--data-dir", default=None, help="override the data dir stored in the run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--table", metavar="RESULTS_DIR",
                   help="write RESULTS_DIR/table1.md from every result.json below it and print it")
    args = p.parse_args(argv)
    if args.table:
        if not os.path.isdir(args.table):
            p.error(f"--table: {args.table} is not a directory")
        md = table1(args.table)
        with open(os.path.join(args.table, "table1.md"), "w") as fh:
            fh.write(md)
        print(md)
        return
    if not args.path:
        p.error("give a run directory or checkpoint file, or --table RESULTS_DIR")
    try:
        r = evaluate_checkpoint(args.path, args.per_class, args.data_dir, args.device)
    except (CheckpointError, ValueError, RuntimeError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    print(f"{r['checkpoint']} (step {r['step']}): top-1 accuracy {100 * r['top1']:.2f} %")
    for name, acc in r.get("per_class", {}).items():
        print(f"  {name:>16s}  {100 * acc:6.2f} %")


if __name__ == "__main__":
    main()
