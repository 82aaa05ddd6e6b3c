"""Train WRN-28-2 with the unified contrastive loss [G] (--loss base) or its entropy-weighted
pair-weighted version [N&O] (--loss entropy). Defaults are the paper's (README: Reconstruction
notes). The peers FixMatch, CCSSL and SimMatch (--loss fixmatch | ccssl | simmatch) run under the
same protocol; each method's step is in methods.py. --lt-labeled ... selects the long-tailed
protocol.

    python train.py --dataset cifar10 --labels-per-class 4 --loss entropy

Re-running the same command with the same --out resumes from the last checkpoint.
"""
import argparse
import copy
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import data
import ddp
import losses
import methods
from evaluate import CheckpointError, eval_metrics, read_checkpoint, scores_all
from model import BN_MOMENTUM, VARIANTS, Encoder, parse_arch

# [N&O] section 4.3: entropy ratio beta per (dataset, labels per class)
PAPER_BETA = {("cifar10", 4): 0.2, ("cifar10", 25): 0.4, ("cifar100", 4): 0.1, ("cifar100", 25): 0.2}
PAPER_WD = {"cifar10": 5e-4, "cifar100": 1e-3}
# a checkpoint is resumed only if these match (the rest, e.g. --device or --log-every, may change)
CONFIG_KEYS = ("dataset", "labels_per_class", "loss", "seed", "arch", "epochs", "steps_per_epoch",
               "batch_size", "mu", "lr", "wd", "threshold", "pl_temp", "temp", "low_weight",
               "entropy_ratio", "entropy_weighting", "entropy_epochs", "ema_decay",
               "bn_momentum", "channels_last", "wrn_variant", "pair_weight", "lambda_u", "lambda_c",
               "ccssl_temp", "lambda_in", "bank_momentum", "bank_temp", "smoothing_alpha",
               "da_len", "lt_labeled", "lt_unlabeled", "imb_ratio_l", "imb_ratio_u", "hard_weight",
               "labeled_idx_sha256")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" except where the default is None: those flags resolve their default
    from others, and their help text says how."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    # data
    a("--dataset", default="cifar10", help="cifar10, cifar100 or npz:PATH (see data.load_npz)")
    a("--data-dir", default="data", help="where CIFAR is (or is downloaded to)")
    a("--labels-per-class", type=int, default=None,
      help="labeled images per class (default 4; not with --labeled-idx or the long-tailed flags)")
    a("--labeled-idx", default=None, metavar="FILE",
      help="the labeled set: training-set indices, one per line (.txt) or a 1-D .npy, e.g. from "
           "query.py; replaces --labels-per-class (an error with it); the whole training set "
           "stays unlabeled data")
    a("--seed", type=int, default=0, help="seed (>= 0) of the split, initialisation and augmentation")
    # method
    a("--loss", choices=list(methods.STEPS), default="entropy",
      help="base = [G] Eqs. (5)-(7); entropy = [N&O] Eqs. (8)-(14); fixmatch, ccssl, simmatch = "
           "the peer methods under the same protocol")
    a("--threshold", type=float, default=0.95,
      help="confidence threshold tau of Eq. (5) (the peers' mask threshold p_cutoff too)")
    a("--pl-temp", type=float, default=None,
      help="base/entropy: temperature T_pl of the pseudo-labels, Eq. (4) (default 0.08: [G]'s "
           "final configs use 0.04 on (cos + 1) / 2)")
    a("--temp", type=float, default=None,
      help="base/entropy: temperature T of the contrastive loss (default 0.1)")
    a("--low-weight", type=float, default=None,
      help="base/entropy: weight lambda of unconfident samples, Eq. (7) (default 0.2)")
    a("--pair-weight", choices=["geometric", "product"], default=None,
      help="entropy: pair weight sqrt(w_i w_p) of Eq. (8) (geometric, default) or CCSSL's "
           "product w_i w_p (ablation)")
    # peer methods (README: peers)
    a("--lambda-u", type=float, default=None,
      help="fixmatch/ccssl/simmatch: weight of the unlabeled cross-entropy (default 1)")
    a("--lambda-c", type=float, default=None, help="ccssl: weight of the contrastive term (default 1)")
    a("--ccssl-temp", type=float, default=None,
      help="ccssl: temperature of the class-aware contrastive loss (default 0.07)")
    a("--lambda-in", type=float, default=None,
      help="simmatch: weight of the instance (bank) consistency loss (default 1)")
    a("--bank-momentum", type=float, default=None,
      help="simmatch: labeled bank update bank <- normalize(m bank + (1-m) z) (default 0.7)")
    a("--bank-temp", type=float, default=None,
      help="simmatch: temperature t of the similarities to the bank (default 0.1)")
    a("--smoothing-alpha", type=float, default=None,
      help="simmatch: p_hat = alpha p_w + (1 - alpha) aggregated bank labels (default 0.9)")
    a("--da-len", type=int, default=None,
      help="simmatch: distribution-alignment queue length in batches (default 32)")
    a("--hard-weight", type=float, default=None,
      help="fixmatch/ccssl/simmatch: SeMi's entropy hard-example weight s: each unlabeled loss "
           "term times s H(p)/log K + 1 - s, from epoch 5 on (default 0: off)")
    # long-tailed protocol (README: long-tailed)
    a("--lt-labeled", type=int, default=None, metavar="N1",
      help="long-tailed split: labeled images of the head class (with --lt-unlabeled, --imb-ratio-l)")
    a("--lt-unlabeled", type=int, default=None, metavar="M1",
      help="long-tailed split: unlabeled images of the head class")
    a("--imb-ratio-l", type=float, default=None, metavar="GAMMA_L",
      help="long-tailed split: labeled imbalance ratio N_1 / N_K")
    a("--imb-ratio-u", type=float, default=None, metavar="GAMMA_U",
      help="long-tailed split: unlabeled imbalance ratio (default: GAMMA_L; negative = reversed, "
           "head classes rare; 1 = uniform)")
    a("--logit-adjust", type=float, default=1.0, metavar="TAU",
      help="tau of the logit-adjusted test accuracy, reported beside the raw one (prediction only)")
    a("--entropy-ratio", type=float, default=None,
      help="beta of Eq. (11); default: the paper's value for CIFAR (required otherwise)")
    a("--entropy-weighting", choices=list(losses.WEIGHTINGS), default="exp",
      help="weight of entropy-selected samples: exp(-kH) (Eqs. 13-14) or linear")
    a("--entropy-epochs", type=int, default=None,
      help="epochs with entropy selection active; default 78.125%% of --epochs (200 of 256)")
    # optimisation
    a("--epochs", type=int, default=256, help="epochs")
    a("--steps-per-epoch", type=int, default=1024, help="training steps per epoch")
    a("--batch-size", type=int, default=64, help="labeled batch size B")
    a("--mu", type=int, default=7, help="unlabeled batch = mu * B; 0 trains on labeled data only")
    a("--lr", type=float, default=0.03, help="SGD learning rate (Nesterov, momentum 0.9)")
    a("--wd", type=float, default=None,
      help="weight decay on >= 2-D tensors; default 5e-4 (cifar10, npz) / 1e-3 (cifar100)")
    a("--ema-decay", type=float, default=0.999, help="EMA decay of the evaluated model")
    a("--bn-momentum", type=float, default=None,
      help="BatchNorm momentum; default 0.001 (the paper's), raised to 5 / total steps (at most "
           "0.1) for runs too short for 0.001 to converge the running statistics")
    # model and system
    a("--arch", default="wrn-28-2", help="wrn-DEPTH-WIDTH, e.g. wrn-10-1 for CPU runs")
    a("--wrn-variant", choices=VARIANTS, default="usb",
      help="usb = [G]'s network (USB's wrn_28_2); tf = FixMatch's TensorFlow original")
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="autocast (bf16, or fp16 + GradScaler where bf16 is not native); default: on for "
           "CUDA, off for CPU")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=True,
      help="channels_last memory format for the model and its inputs")
    a("--out", default=None, help="output dir (default: runs/DATASET_LABELS_LOSS_sSEED)")
    a("--eval-every", type=int, default=1,
      help="evaluate, log metrics and checkpoint every N epochs (at most --epochs)")
    a("--log-every", type=int, default=100, help="progress line every N steps")
    a("--tensorboard", action="store_true",
      help="also write TensorBoard scalars to OUT/tb (needs: pip install tensorboard)")
    a("--save-every", type=int, default=0, help="also checkpoint every N steps (0: per eval only)")
    a("--skip-nonfinite", type=int, default=0,
      help="skip up to N steps whose loss is not finite (costs a host sync per step); "
           "0 stops the run at the first one")
    a("--eval-batch-size", type=int, default=1024, help="batch size of test evaluation")
    a("--debug-nan-step", type=int, default=-1, help=argparse.SUPPRESS)  # test-only fault injection
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every value is checked before any data is loaded: one argparse error line each."""
    check_labeled_idx(p, args)
    check_long_tailed(p, args)
    for name in ("epochs", "steps_per_epoch", "batch_size", "eval_every",
                 "log_every", "eval_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("mu", "save_every", "skip_nonfinite"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    check_method_flags(p, args)
    for name in ("lr", "pl_temp", "temp", "ccssl_temp", "bank_temp"):
        v = getattr(args, name)
        if v is not None and (not v > 0 or not math.isfinite(v)):
            p.error(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    for name in ("lambda_u", "lambda_c", "lambda_in"):
        v = getattr(args, name)
        if v is not None and (not v >= 0 or not math.isfinite(v)):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if args.labels_per_class is not None and args.labels_per_class < 1:
        p.error(f"--labels-per-class must be >= 1, got {args.labels_per_class}")
    for name in ("bank_momentum", "smoothing_alpha", "hard_weight"):
        v = getattr(args, name)
        if v is not None and not 0 <= v <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    if args.da_len is not None and args.da_len < 1:
        p.error(f"--da-len must be >= 1, got {args.da_len}")
    if not 0 <= args.threshold <= 1:
        p.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.low_weight is not None and not 0 < args.low_weight <= 1:
        p.error(f"--low-weight must be in (0, 1], got {args.low_weight}")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not (args.dataset in data.CIFAR_URLS or args.dataset.startswith("npz:")):
        p.error(f"--dataset: unknown dataset {args.dataset!r}; use cifar10, cifar100 or npz:PATH")
    try:
        parse_arch(args.arch)
    except ValueError as e:
        p.error(str(e))
    if args.bn_momentum is None:
        total = args.epochs * args.steps_per_epoch
        args.bn_momentum = min(0.1, max(BN_MOMENTUM, 5.0 / total))
    if not 0 < args.bn_momentum <= 1:
        p.error(f"--bn-momentum must be in (0, 1], got {args.bn_momentum}")
    if args.wd is None:
        args.wd = PAPER_WD.get(args.dataset, 5e-4)
    if not (args.wd >= 0 and math.isfinite(args.wd)):
        p.error(f"--wd must be a finite number >= 0, got {args.wd}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0 (numpy and torch generators take non-negative seeds), "
                f"got {args.seed}")
    if args.eval_every > args.epochs:
        p.error(f"--eval-every {args.eval_every} is larger than --epochs {args.epochs}: the run "
                f"would be evaluated only once, at the end; use --eval-every <= {args.epochs}")
    if args.loss == "entropy":
        if args.entropy_ratio is None:
            args.entropy_ratio = PAPER_BETA.get((args.dataset, args.labels_per_class))
            if args.entropy_ratio is None:
                split = ("the long-tailed split" if args.lt_labeled else
                         f"the labeled set of {args.labeled_idx}" if args.labeled_idx else
                         f"{args.labels_per_class} labels per class")
                p.error(f"--entropy-ratio is required for {args.dataset} with {split} (the paper "
                        f"gives beta only for CIFAR-10/100 with 4 or 25); e.g. --entropy-ratio 0.2")
        if not 0 < args.entropy_ratio <= 1:
            p.error(f"--entropy-ratio must be in (0, 1], got {args.entropy_ratio}")
        if args.entropy_epochs is None:
            args.entropy_epochs = round(args.epochs * 200 / 256)
        if not 0 <= args.entropy_epochs <= args.epochs:
            p.error(f"--entropy-epochs must be in [0, --epochs={args.epochs}], got {args.entropy_epochs}")
    elif args.entropy_ratio is not None or args.entropy_epochs is not None:
        p.error("--entropy-ratio and --entropy-epochs apply to --loss entropy only")
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # optional extra, only for this flag
        except ImportError:
            p.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device}")
    if args.amp is None:
        args.amp = args.device.startswith("cuda")
    _, local_rank, world_size = ddp.world()
    if world_size > 1:  # torchrun: B and mu B are global and split evenly over the ranks
        if args.batch_size % world_size or (args.mu * args.batch_size) % world_size:
            p.error(f"--batch-size {args.batch_size} and mu x B = {args.mu * args.batch_size} must "
                    f"divide by the {world_size} processes of torchrun")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{local_rank}"  # one GPU per local rank
    if args.out is None:
        name = (os.path.splitext(os.path.basename(args.dataset[4:]))[0]
                if args.dataset.startswith("npz:") else args.dataset)
        split = (f"lt{args.lt_labeled}-{args.lt_unlabeled}-{args.imb_ratio_l:g}-{args.imb_ratio_u:g}"
                 if args.lt_labeled else f"idx-{args.labeled_idx_sha256[:8]}"
                 if args.labeled_idx else str(args.labels_per_class))
        args.out = os.path.join("runs", f"{name}_{split}_{args.loss}_s{args.seed}")
    args.out_created = first_missing(args.out)  # removed again if the run fails at once
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, f".write_test.{os.getpid()}")  # one per process (torchrun)
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as e:
        p.error(f"--out {args.out} is not writable: {e.strerror}")


def check_labeled_idx(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--labeled-idx FILE replaces the seeded split; the file is read and checked now (its range
    once the dataset is loaded) and its sha256 becomes part of the configuration."""
    args.labeled_idx_sha256 = None
    if args.labeled_idx is None:
        return
    lt = [args.lt_labeled, args.lt_unlabeled, args.imb_ratio_l, args.imb_ratio_u]
    if args.labels_per_class is not None or any(v is not None for v in lt):
        p.error("--labeled-idx sets the labeled set; do not combine it with --labels-per-class "
                "or the long-tailed flags")
    try:
        data.read_index_file(args.labeled_idx)
        args.labeled_idx_sha256 = data.sha256_of(args.labeled_idx)
    except (ValueError, OSError) as e:
        p.error(f"--labeled-idx: {e}")



def check_long_tailed(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The long-tailed flags go together and replace --labels-per-class."""
    lt = [args.lt_labeled, args.lt_unlabeled, args.imb_ratio_l]
    if args.labeled_idx is not None:
        return
    if all(v is None for v in lt + [args.imb_ratio_u]):
        args.labels_per_class = 4 if args.labels_per_class is None else args.labels_per_class
        return
    if any(v is None for v in lt):
        p.error("the long-tailed split needs --lt-labeled, --lt-unlabeled and --imb-ratio-l together")
    if args.labels_per_class is not None:
        p.error("--labels-per-class does not apply to the long-tailed split (--lt-labeled sets the "
                "labeled counts)")
    if args.imb_ratio_u is None:
        args.imb_ratio_u = args.imb_ratio_l
    if args.lt_labeled < 1 or args.lt_unlabeled < 0:
        p.error(f"--lt-labeled must be >= 1 and --lt-unlabeled >= 0, got {args.lt_labeled} and "
                f"{args.lt_unlabeled}")
    if not args.imb_ratio_l >= 1 or not abs(args.imb_ratio_u) >= 1:
        p.error(f"--imb-ratio-l must be >= 1 and |--imb-ratio-u| >= 1 (negative = reversed), got "
                f"{args.imb_ratio_l} and {args.imb_ratio_u}")


def check_method_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A method flag given for a method it does not apply to is an error; the rest get their
    method's default (None where they do not apply, so the saved configuration says so)."""
    for name, (default, owners) in methods.FLAGS.items():
        if args.loss not in owners:
            if getattr(args, name) is not None:
                p.error(f"--{name.replace('_', '-')} applies to --loss {' / '.join(owners)} only, "
                        f"not --loss {args.loss}")
        elif getattr(args, name) is None:
            setattr(args, name, default)


def fail(msg: str) -> None:
    sys.exit(f"train.py: error: {msg}")


# ---------------------------------------------------------------- pieces of the step

def amp_dtype_for(dev: torch.device) -> torch.dtype:
    """bf16 where the device has it natively (CPU; CUDA compute capability >= 8.0), else fp16
    with a GradScaler. torch.cuda.is_bf16_supported() alone also counts emulation (slow, and it
    would make the fp16 path unreachable)."""
    if dev.type != "cuda":
        return torch.bfloat16
    major, _ = torch.cuda.get_device_capability(dev)
    return torch.bfloat16 if major >= 8 else torch.float16


def lr_at(step: int, total: int, lr: float) -> float:
    """Cosine decay of FixMatch / [G]: lr cos(7 pi k / (16 K))."""
    return lr * math.cos(7 * math.pi * step / (16 * total))


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.SGD:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    fused = args.device.startswith("cuda")
    return torch.optim.SGD([{"params": decay, "weight_decay": args.wd},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=args.lr, momentum=0.9, nesterov=True,
                           fused=fused or None, foreach=None if fused else True)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """EMA of parameters (one foreach lerp), buffers (BN statistics) copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    torch._foreach_copy_(list(ema.buffers()), list(model.buffers()))


def split_indices(y: np.ndarray, k: int, args) -> tuple[np.ndarray, np.ndarray]:
    """(labeled, unlabeled) training indices: the seeded per-class split with the whole training
    set unlabeled (FixMatch, [G]), the indices of --labeled-idx (README: active learning), or the
    long-tailed split with disjoint sets (README: long-tailed)."""
    if args.labeled_idx:
        if data.sha256_of(args.labeled_idx) != args.labeled_idx_sha256:
            raise ValueError(f"--labeled-idx {args.labeled_idx} changed while the run started; "
                             f"run the command again")
        idx = data.read_index_file(args.labeled_idx)
        data.check_index_range(idx, len(y), args.labeled_idx)
        return idx, np.arange(len(y))
    if args.lt_labeled:
        return data.split_long_tailed(y, args.lt_labeled, args.lt_unlabeled, args.imb_ratio_l,
                                      args.imb_ratio_u, args.seed, k)
    return data.split_labeled(y, args.labels_per_class, args.seed, k), np.arange(len(y))


class Run:
    """Everything a step touches, and what a checkpoint must hold to resume it exactly."""

    def __init__(self, args):
        self.args = args
        dev = self.dev = torch.device(args.device)
        self.rank, _, self.world = ddp.world()
        if self.world > 1:
            ddp.init(dev.type)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convs once
        try:
            ds = data.load_dataset(args.dataset, args.data_dir)
            self.k = ds["num_classes"]
            self.labeled_idx, self.unlabeled_idx = split_indices(ds["y_train"], self.k, args)
        except (ValueError, RuntimeError) as e:
            fail(str(e))
        self.classes = ds["classes"]
        self.mean, self.std = data.channel_stats(ds["x_train"])
        self.x_train = data.to_tensor_images(ds["x_train"], dev)
        self.y_train = torch.from_numpy(ds["y_train"]).to(dev)
        self.x_test = data.to_tensor_images(ds["x_test"], dev)
        self.y_test = torch.from_numpy(ds["y_test"]).to(dev)
        self.lb = torch.from_numpy(self.labeled_idx).to(dev)
        self.ulb = torch.from_numpy(self.unlabeled_idx).to(dev)
        self.labeled_counts = np.bincount(ds["y_train"][self.labeled_idx], minlength=self.k).tolist()
        self.norm = data.Normalize(self.mean, self.std, dev, channels_last=args.channels_last)

        torch.manual_seed(args.seed)
        self.model = Encoder(self.k, args.arch, bn_momentum=args.bn_momentum,
                             classifier=args.loss in methods.CLASSIFIER,
                             variant=args.wrn_variant).to(dev)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.world > 1 and dev.type == "cuda":  # BN over the global batch, as [G] ran it
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.forward = self.model
        if self.world > 1:  # FixMatch does not use the projection head: DDP must allow that
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None,
                find_unused_parameters=args.loss == "fixmatch")
        if args.compile:
            self.forward = torch.compile(self.forward)
        self.opt = make_optimizer(self.model, args)
        self.amp_dtype = amp_dtype_for(dev) if args.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.g_aug = torch.Generator(dev).manual_seed(args.seed + 1)
        self.sampler_lb = data.IndexSampler(len(self.lb), args.batch_size,
                                            torch.Generator(dev).manual_seed(args.seed + 2))
        self.sampler_ulb = (data.IndexSampler(len(self.ulb), args.mu * args.batch_size,
                                              torch.Generator(dev).manual_seed(args.seed + 3))
                            if args.mu > 0 else None)
        self.step_fn = methods.STEPS[args.loss]
        self.n_strong = methods.STRONG_VIEWS[args.loss]
        self.method_state = methods.make_state(args.loss, self.y_train[self.lb], self.k, args.da_len,
                                               torch.Generator(dev).manual_seed(args.seed + 4))
        self.total = args.epochs * args.steps_per_epoch
        self.step = 0
        self.history: list[float] = []  # test accuracy of each evaluation
        self.last_test: dict = {}  # the metrics of the last evaluation
        self.elapsed = 0.0  # training seconds over all sessions
        self.stats = self.new_stats()
        self.pl_confusion = self.new_confusion()
        self.nonfinite = torch.zeros(2, device=dev)  # [count, first bad step + 1]
        self.bad_loss = torch.zeros((), device=dev)
        self.skipped = 0

    def new_stats(self) -> torch.Tensor:
        # loss sum, steps, then the method's diagnostic counts (methods.DIAG)
        return torch.zeros(2 + len(methods.DIAG), device=self.dev, dtype=torch.float64)

    def new_confusion(self) -> torch.Tensor:
        # (confident, entropy-selected, unconfident) x true class x argmax class, over an interval
        return torch.zeros(3, self.k, self.k, device=self.dev, dtype=torch.float64)

    # ---------------------------------------------------------------- the training step

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """[weak(x_lb); weak(x_ulb); strong1(x_ulb) (; strong2(x_ulb))], normalised, on the device,
        with the labels, the labeled images' positions in the labeled set, and the unlabeled
        images' true labels (for the diagnostics only)."""
        pos_lb = self.sampler_lb.next()
        idx = self.lb[pos_lb]
        x_lb, y_lb = self.x_train[idx], self.y_train[idx]
        parts = [data.weak(x_lb, self.g_aug)]
        y_ulb, n_ulb = None, 0
        if self.sampler_ulb is not None:
            idx_ulb = self.ulb[self.sampler_ulb.next()]
            x_ulb, y_ulb, n_ulb = self.x_train[idx_ulb], self.y_train[idx_ulb], len(idx_ulb)
            parts += [data.weak(x_ulb, self.g_aug),
                      *data.strong(torch.cat([x_ulb] * self.n_strong), self.g_aug).split(n_ulb)]
        self.view_sizes = [len(v) for v in parts]
        if self.world > 1:  # the same global batch on every rank; each forwards its own slice
            parts = ddp.local_views(parts, self.rank, self.world)
        return self.norm(torch.cat(parts)), y_lb, pos_lb, y_ulb, n_ulb

    def train_step(self) -> None:
        a = self.args
        x, y_lb, pos_lb, y_ulb, n_ulb = self.batch()
        with torch.autocast(self.dev.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            z, logits = self.forward(x)
        z, logits = (ddp.gather_views(t, self.view_sizes, self.world) for t in (z, logits))
        out = methods.split_views(z.float(), None if logits is None else logits.float(), len(y_lb),
                                  n_ulb, self.n_strong, y_lb, pos_lb, y_ulb)
        entropy_on = a.loss == "entropy" and self.step < a.entropy_epochs * a.steps_per_epoch
        loss, diag, confusion = self.step_fn(out, self.model, a, entropy_on, self.method_state,
                                             self.step // a.steps_per_epoch)
        if self.step == a.debug_nan_step:
            loss = loss * float("nan")

        bad = ~torch.isfinite(loss)
        if a.skip_nonfinite and bool(bad):  # opt-in per-step host sync
            self.skipped += 1
            print(f"step {self.step + 1}: non-finite loss {loss.item()}, step skipped "
                  f"({self.skipped} of at most {a.skip_nonfinite})", flush=True)
            if self.skipped > a.skip_nonfinite:
                fail(f"more than --skip-nonfinite={a.skip_nonfinite} non-finite losses; last at "
                     f"step {self.step + 1}; {self.kept()}")
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            return
        first = (self.nonfinite[0] == 0) & bad
        self.bad_loss = torch.where(first, loss.detach(), self.bad_loss)
        self.nonfinite += torch.stack([bad.to(self.nonfinite.dtype),
                                       first.to(self.nonfinite.dtype) * (self.step + 1)])

        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.total, a.lr)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        ema_update(self.ema, self.model, a.ema_decay)

        one = torch.ones((), device=self.dev, dtype=torch.float64)
        self.stats += torch.cat([torch.stack([loss.detach().double(), one]), diag])
        self.pl_confusion += confusion
        self.step += 1

    def evaluate(self) -> dict:
        """Test metrics of the EMA model (float32, eval mode): overall, per-class, head / medium /
        tail, raw and logit-adjusted. Prototype scores are cos / T_pl, as in Eq. (4)."""
        scores = scores_all(self.ema, self.x_test, self.norm, self.args.eval_batch_size)
        if self.args.loss not in methods.CLASSIFIER:
            scores = scores / self.args.pl_temp
        return eval_metrics(scores, self.y_test, self.labeled_counts, self.args.logit_adjust)

    def check_finite(self) -> None:
        """Called at logging and saving time only (a host sync)."""
        count, first = self.nonfinite.tolist()
        if count:
            fail(f"non-finite loss at step {int(first)} (loss = {self.bad_loss.item()}, "
                 f"{int(count)} non-finite step(s) since); stopped without saving, "
                 f"{self.kept()}. Lower --lr, try --no-amp, or pass --skip-nonfinite N to skip "
                 f"such steps")

    def kept(self) -> str:
        """What a failing run leaves behind, said truthfully."""
        if os.path.exists(os.path.join(self.args.out, "last.pt")):
            return f"the last good checkpoint in {self.args.out} is kept"
        return f"no checkpoint had been written yet in {self.args.out}"

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        a = self.args
        return {
            "format": 1, "step": self.step, "args": public_args(a), "cwd": os.getcwd(),
            "device_type": self.dev.type, "amp_dtype": str(self.amp_dtype), "world_size": self.world,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.dev.type == "cuda" else [],
            "rng_aug": self.g_aug.get_state(),
            "sampler_lb": self.sampler_lb.state_dict(),
            "sampler_ulb": self.sampler_ulb.state_dict() if self.sampler_ulb else {},
            "labeled_idx": torch.from_numpy(self.labeled_idx),
            "unlabeled_idx": torch.from_numpy(self.unlabeled_idx),
            "mean": self.mean, "std": self.std, "classes": list(self.classes),
            "history": list(self.history), "elapsed": self.elapsed, "last_test": self.last_test,
            "stats": self.stats.cpu(), "pl_confusion": self.pl_confusion.cpu(),
            "skipped": self.skipped,
            "method_state": self.method_state.state_dict() if self.method_state else {},
        }

    def load_state_dict(self, s: dict) -> None:
        a = self.args
        diffs = [f"{k}: checkpoint {s['args'].get(k)!r}, now {getattr(a, k)!r}"
                 for k in CONFIG_KEYS if s["args"].get(k) != getattr(a, k)]
        if diffs:
            fail(f"{a.out} holds a run with a different configuration ({'; '.join(diffs)}); "
                 "use another --out or the original arguments")
        self.check_resumable_here(s)
        same_ulb = "unlabeled_idx" not in s or np.array_equal(s["unlabeled_idx"].numpy(),
                                                               self.unlabeled_idx)
        if not np.array_equal(s["labeled_idx"].numpy(), self.labeled_idx) or not same_ulb:
            fail(f"{a.out}: the labeled split differs from the checkpoint's (dataset changed?)")
        self.model.load_state_dict(s["model"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["optimizer"])
        self.scaler.load_state_dict(s["scaler"])
        torch.set_rng_state(s["rng_torch"])
        if self.dev.type == "cuda" and s["rng_cuda"]:
            torch.cuda.set_rng_state_all(s["rng_cuda"])
        self.g_aug.set_state(s["rng_aug"])
        self.sampler_lb.load_state_dict(s["sampler_lb"])
        if self.sampler_ulb:
            self.sampler_ulb.load_state_dict(s["sampler_ulb"])
        self.step, self.history, self.elapsed = s["step"], list(s["history"]), s["elapsed"]
        self.last_test = s.get("last_test", {})
        self.stats = s["stats"].to(self.dev)
        self.pl_confusion = s["pl_confusion"].to(self.dev)
        self.skipped = s["skipped"]
        if self.method_state:
            self.method_state.load_state_dict(s["method_state"])

    def check_resumable_here(self, s: dict) -> None:
        """What can change on resume: the device index, bf16 autocast on/off. What cannot: the
        device type (CPU and CUDA generators have different states) and fp16, whose GradScaler
        state (the loss scale) has no counterpart in a bf16 or fp32 run and vice versa."""
        if s.get("world_size", 1) != self.world:
            fail(f"{self.args.out} was trained with {s.get('world_size', 1)} process(es) and cannot "
                 f"resume with {self.world}: the global batch is split differently; resume with "
                 f"torchrun --nproc_per_node={s.get('world_size', 1)}, or start a new --out")
        was = s.get("device_type", "cpu")
        if was != self.dev.type:
            fail(f"{self.args.out} was trained on {was} and cannot resume on {self.dev.type} (the "
                 f"random generators' states differ between device types); resume with "
                 f"--device {was}, or start a new run with another --out")
        fp16_then, fp16_now = s.get("amp_dtype") == str(torch.float16), self.amp_dtype == torch.float16
        if fp16_then != fp16_now:
            fail(f"{self.args.out} was trained with amp {s.get('amp_dtype')} and now it would be "
                 f"{self.amp_dtype}: fp16 runs keep a GradScaler state that other precisions do "
                 f"not have; resume on the same kind of GPU, or start a new run with another --out")

    def save(self) -> None:
        """Atomic: write last.pt.tmp, fsync, keep the old last.pt as prev.pt, rename."""
        self.check_finite()
        out = self.args.out
        path, tmp, prev = (os.path.join(out, n) for n in ("last.pt", "last.pt.tmp", "prev.pt"))
        try:
            with open(tmp, "wb") as fh:
                torch.save(self.state_dict(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            if os.path.exists(path):
                os.replace(path, prev)
            os.replace(tmp, path)
            dir_fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
            try:
                os.remove(tmp)
            except OSError:
                pass
            reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:120]
            fail(f"could not write checkpoint {path}: {reason} (disk full or not writable?); "
                 f"{self.kept().replace('last good', 'previous')}. Free space and run the same "
                 f"command again to resume")


# ---------------------------------------------------------------- logging

HIDDEN_ARGS = ("debug_nan_step", "out_created")  # test-only fault injection, bookkeeping


def public_args(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in HIDDEN_ARGS}


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


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
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


def per_class_pl(confusion: torch.Tensor) -> dict:
    """Per assigned class: how many unlabeled samples got it as their pseudo-label (confident /
    entropy-selected) over the interval, and how many of those were right."""
    c = confusion.round().long().cpu()
    return {"assigned_confident": c[0].sum(0).tolist(), "correct_confident": c[0].diagonal().tolist(),
            "assigned_selected": c[1].sum(0).tolist(), "correct_selected": c[1].diagonal().tolist()}


def write_confusion(out: str, confusion: torch.Tensor) -> None:
    """OUT/pl_confusion.npy: (3, K, K) int64 counts (confident, entropy-selected, unconfident) x
    true class x argmax class of the last evaluation interval; written atomically."""
    tmp = os.path.join(out, "pl_confusion.tmp.npy")
    np.save(tmp, confusion.round().long().cpu().numpy())
    os.replace(tmp, os.path.join(out, "pl_confusion.npy"))


def open_tensorboard(out: str, step: int):
    """A SummaryWriter in OUT/tb; on resume, points logged after the checkpoint's step are purged
    (they are logged again), so no step appears twice."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(out, "tb"), purge_step=step + 1 if step > 0 else None)


def tb_scalars(tb, prefix: str, values: dict, step: int) -> None:
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
            tb.add_scalar(f"{prefix}/{k}", v, step)


def epoch_metrics(run: Run, test: dict) -> dict:
    loss_sum, steps, n_ulb, conf, sel, unconf, conf_ok, sel_ok, w_sum, hat_ok, pw_ok = \
        run.stats.tolist()
    simmatch = run.args.loss == "simmatch" and n_ulb
    return {"step": run.step, "epoch": run.step / run.args.steps_per_epoch,
            "lr": lr_at(run.step - 1, run.total, run.args.lr), "loss": loss_sum / max(steps, 1),
            **test, "confident": conf / max(n_ulb, 1), "entropy_selected": sel / max(n_ulb, 1),
            "unconfident": unconf / max(n_ulb, 1),
            "pl_acc_confident": conf_ok / conf if conf else None,
            "pl_acc_selected": sel_ok / sel if sel else None,
            "mean_weight": w_sum / n_ulb if n_ulb else None,
            "pl_acc_p_hat": hat_ok / n_ulb if simmatch else None,  # SimMatch: argmax p_hat right
            "pl_acc_p_w": pw_ok / n_ulb if simmatch else None,  # and argmax of aligned p_w
            "elapsed_s": round(run.elapsed, 1), "pl_per_class": per_class_pl(run.pl_confusion)}


def versions() -> dict:
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_result(run: Run) -> dict:
    h = run.history
    res = {"final_acc": h[-1], "median_last20_acc": statistics.median(h[-20:]), "best_acc": max(h),
           "final": run.last_test, "labeled_counts": run.labeled_counts, "evaluations": len(h),
           "steps": run.step, "wall_time_s": round(run.elapsed, 1),
           "device": device_name(run.dev), "versions": versions(), "args": public_args(run.args)}
    tmp = os.path.join(run.args.out, "result.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(tmp, os.path.join(run.args.out, "result.json"))
    return res


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    args = get_args(argv)
    try:
        run = Run(args)
        state, f = load_checkpoint_all_ranks(run)
    except SystemExit:
        remove_if_empty(args)
        raise
    if run.rank != 0:  # rank 0 alone prints, evaluates, logs and checkpoints
        sys.stdout = open(os.devnull, "w")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if state is not None:
        run.load_state_dict(state)
        if run.rank == 0:
            truncate_metrics(metrics_path, run.step)
        print(f"resumed from {f} at step {run.step}/{run.total}")
    elif os.path.exists(metrics_path) and run.rank == 0:
        os.remove(metrics_path)  # a fresh run; old metrics without a checkpoint are stale
    ipb = args.batch_size * (1 + (1 + run.n_strong) * args.mu)
    print(f"{args.dataset}: {len(run.x_train)} train / {len(run.x_test)} test images, {run.k} "
          f"classes, {len(run.lb)} labeled | loss {args.loss}"
          + (f" (beta {args.entropy_ratio}, {args.entropy_weighting} weighting, first "
             f"{args.entropy_epochs} epochs, {args.pair_weight} pair weight)"
             if args.loss == "entropy" else "")
          + f" | {args.arch} (BN momentum {args.bn_momentum:g}) on {device_name(run.dev)}, "
            f"amp {str(run.amp_dtype).replace('torch.', '') if run.amp_dtype else 'off'} | "
            f"{run.total} steps x {ipb} images -> {args.out}", flush=True)

    unlabeled_classes = [run.classes[c] for c, n in enumerate(run.labeled_counts) if n == 0]
    if unlabeled_classes:  # allowed (e.g. an active-learning start), but worth knowing
        print(f"warning: {len(unlabeled_classes)} of {run.k} classes have no labeled image: "
              f"{', '.join(unlabeled_classes[:10])}{' ...' if len(unlabeled_classes) > 10 else ''}",
              file=sys.stderr)
    tb = open_tensorboard(args.out, run.step) if args.tensorboard and run.rank == 0 else None
    try:
        train_loop(run, metrics_path, ipb, tb)
    except KeyboardInterrupt:
        fail(f"interrupted at step {run.step}; run the same command again to resume from the "
             f"last checkpoint in {args.out}")
    if tb is not None:
        tb.close()
    if run.rank != 0:
        return {}
    res = write_result(run)
    print(f"done: final {100 * res['final_acc']:.2f} %, median of last 20 "
          f"{100 * res['median_last20_acc']:.2f} %, best {100 * res['best_acc']:.2f} % "
          f"-> {args.out}/result.json", flush=True)
    return res


def load_checkpoint_all_ranks(run: Run) -> tuple[dict | None, str | None]:
    """Rank 0 reads (and may move a corrupt last.pt aside) first; the other ranks then read the
    same file, so every rank resumes from the same state."""
    if run.world == 1:
        return load_checkpoint(run.args.out)
    import torch.distributed as dist
    if run.rank == 0:
        found = load_checkpoint(run.args.out)
    dist.barrier()
    if run.rank != 0:
        found = load_checkpoint(run.args.out)
    return found


def load_checkpoint(out: str) -> tuple[dict | None, str | None]:
    """The newest readable checkpoint of OUT, or (None, None) for a fresh run. A corrupt last.pt
    is moved aside to last.pt.corrupt when prev.pt is used instead, so that the next save cannot
    rotate the unreadable file over the only good backup."""
    try:
        state, f = read_checkpoint(out)
    except CheckpointError as e:
        if any(os.path.exists(os.path.join(out, n)) for n in ("last.pt", "prev.pt")):
            fail(str(e))
        return None, None
    last = os.path.join(out, "last.pt")
    if f.endswith("prev.pt") and os.path.exists(last):
        os.replace(last, last + ".corrupt")
        print(f"moved the unreadable {last} aside to last.pt.corrupt; resuming from {f}",
              file=sys.stderr)
    return state, f


def first_missing(path: str) -> str | None:
    """The outermost folder of path that does not exist yet (None if path exists)."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path):
        path, top = os.path.dirname(path), path
    return top


def remove_if_empty(args: argparse.Namespace) -> None:
    """A run that failed before its first step leaves no empty --out behind, nor the empty
    parent folders (e.g. runs/) that creating it made."""
    top = getattr(args, "out_created", None)
    path = os.path.abspath(args.out)
    while top and path.startswith(top):
        try:
            os.rmdir(path)  # only if empty
        except OSError:
            return
        if path == top:
            return
        path = os.path.dirname(path)


def train_loop(run: Run, metrics_path: str, ipb: int, tb=None) -> None:
    """Steps until the end; progress lines, evaluations, metrics and checkpoints on schedule."""
    args = run.args
    t_session, elapsed0 = time.perf_counter(), run.elapsed
    steps_per_eval = args.eval_every * args.steps_per_epoch
    t_log, step_log = time.perf_counter(), run.step
    while run.step < run.total:
        run.train_step()
        run.elapsed = elapsed0 + time.perf_counter() - t_session
        if run.step % args.log_every == 0 or run.step == run.total:
            run.check_finite()
            s = run.stats.tolist()
            now = time.perf_counter()
            rate = (run.step - step_log) / max(now - t_log, 1e-9)
            n_ulb = max(s[2], 1)
            print(f"step {run.step}/{run.total} loss {s[0] / max(s[1], 1):.4f} "
                  f"lr {lr_at(run.step - 1, run.total, args.lr):.4f} conf {s[3] / n_ulb:.3f} "
                  f"sel {s[4] / n_ulb:.3f} unconf {s[5] / n_ulb:.3f} | {rate * ipb:.0f} img/s "
                  f"ETA {(run.total - run.step) / max(rate, 1e-9) / 60:.1f} min", flush=True)
            if tb is not None:
                tb_scalars(tb, "train", {"loss": s[0] / max(s[1], 1), "img_s": rate * ipb,
                                         "lr": lr_at(run.step - 1, run.total, args.lr)}, run.step)
            t_log, step_log = now, run.step
        if run.rank != 0:  # the other ranks only train
            continue
        if run.step % steps_per_eval == 0 or run.step == run.total:
            run.check_finite()
            run.last_test = run.evaluate()
            acc = run.last_test["test_acc"]
            run.history.append(acc)
            m = epoch_metrics(run, run.last_test)
            append_jsonl(metrics_path, m)
            pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731
            print(f"epoch {m['epoch']:.2f}: test acc {100 * acc:.2f} % (EMA) | pseudo-label "
                  f"accuracy: confident {pct(m['pl_acc_confident'])}, entropy-selected "
                  f"{pct(m['pl_acc_selected'])} | mean unlabeled weight "
                  f"{'-' if m['mean_weight'] is None else format(m['mean_weight'], '.3f')}", flush=True)
            write_confusion(args.out, run.pl_confusion)
            if tb is not None:
                tb_scalars(tb, "eval", m, run.step)
            run.stats, run.pl_confusion = run.new_stats(), run.new_confusion()
            save(run, tb)
        elif args.save_every and run.step % args.save_every == 0:
            save(run, tb)


def save(run: Run, tb) -> None:
    """Checkpoint; TensorBoard's points up to this step are flushed first, so that a resume from
    this checkpoint neither loses nor repeats any."""
    if tb is not None:
        tb.flush()
    run.save()


if __name__ == "__main__":
    main()
