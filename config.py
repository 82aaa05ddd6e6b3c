"""The whole command line of train.py: every flag with its default, the derived defaults, the checks.

`get_args` parses, checks every value before any data is loaded (one argparse error line each) and
resolves the defaults that depend on other flags (`resolve_defaults`): beta per Table 1 cell,
weight decay per dataset, BN momentum for short runs, the entropy epochs, the method flags'
defaults (methods.FLAGS), device, AMP and --out.
"""
import argparse
import importlib
import math
import os

import torch

import checkpoint
import data
import ddp
import losses
import methods
from model import BN_MOMENTUM, VARIANTS, parse_arch

DESCRIPTION = """Train WRN-28-2 with the unified contrastive loss [G] (--loss base) or its entropy-weighted
pair-weighted version [N&O] (--loss entropy). Defaults are the paper's (docs/method.md). The peers
FixMatch, CCSSL and SimMatch (--loss fixmatch | ccssl | simmatch) run under the same protocol;
each method's step is in methods.py. --lt-labeled ... selects the long-tailed protocol.

    python train.py --dataset cifar10 --labels-per-class 4 --loss entropy

Re-running the same command with the same --out resumes from the last checkpoint.
"""
# [N&O] section 4.3: entropy ratio beta per (dataset, labels per class)
PAPER_BETA = {("cifar10", 4): 0.2, ("cifar10", 25): 0.4, ("cifar100", 4): 0.1, ("cifar100", 25): 0.2}
PAPER_WD = {"cifar10": 5e-4, "cifar100": 1e-3}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" except where the default is None: those flags resolve their default
    from others, and their help text says how."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=HelpFormatter)
    a = p.add_argument
    # ---------------------------------------------------------------- data
    a("--dataset", default="cifar10",
      help="cifar10, cifar100, stl10, svhn, mnist, fashionmnist, usps (downloaded into "
           "--data-dir), npz:PATH (arrays x_train, y_train, x_test, y_test, optional x_unlabeled) "
           "or folder:PATH (PATH/train/<class>/, PATH/test/<class>/, optional PATH/unlabeled/); "
           "see docs/own_data.md")
    a("--data-dir", default="data",
      help="where the built-in datasets are (or are downloaded to); for mnist / fashionmnist a "
           "folder holding the four IDX files works too")
    a("--labels-per-class", type=labels_arg, default=None,
      help="labeled images per class, or 'all' (every training image with a label) (default 4; "
           "not with --labeled-idx, --stl10-fold or the long-tailed flags)")
    a("--seed", type=int, default=0, help="seed (>= 0) of the split, initialisation and augmentation")
    # ---------------------------------------------------------------- own data (docs/own_data.md)
    a("--val-per-class", type=int, default=0, metavar="N",
      help="hold N labeled training images per class out of both the labeled and the unlabeled "
           "set as a validation split (seeded), evaluated at every evaluation; result.json then "
           "gives the test accuracy at the best validation accuracy (0: none)")
    a("--flip", action=argparse.BooleanOptionalAction, default=None,
      help="random horizontal flip in the weak augmentation (and so in the strong one); default: "
           "on, off (--no-flip) for the digit sets svhn, mnist and usps")
    a("--data-device", choices=["device", "cpu"], default="device",
      help="where the uint8 training and test images live: on the training device (fastest), or "
           "in (pinned) host memory with each batch moved to the device before augmentation, for "
           "data larger than the GPU; the results are the same")
    a("--image-size", type=int, default=None, metavar="S",
      help="folder: datasets only: resize every image to S x S (bilinear); needed when the "
           "images differ in size")
    a("--stl10-fold", type=int, default=None, metavar="K",
      help="stl10 only: the labeled set is STL-10's predefined fold K (0-9, 1,000 images) "
           "instead of --labels-per-class")
    # ---------------------------------------------------------------- method ([G], [N&O])
    a("--loss", choices=list(methods.STEPS), default="entropy",
      help="base = [G] Eqs. (5)-(7); entropy = [N&O] Eqs. (8)-(14); fixmatch, ccssl, simmatch = "
           "the peer methods under the same protocol; semi = SeMi (long-tailed; docs/long_tailed.md)")
    a("--threshold", type=float, default=None,
      help="confidence threshold tau of Eq. (5) (the peers' mask threshold p_cutoff too); "
           "default 0.95, for --loss semi 0.7 (SeMi's README; its code's default is 0.95)")
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
    a("--entropy-ratio", type=float, default=None,
      help="beta of Eq. (11); default: the paper's value for CIFAR (required otherwise)")
    a("--entropy-weighting", choices=list(losses.WEIGHTINGS), default="exp",
      help="weight of entropy-selected samples: exp(-kH) (Eqs. 13-14) or linear; unique-exp: "
           "the other reading, selected samples weight 1 and the remaining unique-label "
           "samples exp(-kH) (lambda at H_th, less above)")
    a("--entropy-epochs", type=int, default=None,
      help="epochs with entropy selection active; default 78.125%% of --epochs (200 of 256)")
    # ---------------------------------------------------------------- peer methods (docs/peers.md)
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
    # SeMi in full (--loss semi, docs/long_tailed.md); --threshold defaults to 0.7 for it
    a("--oheml-scale", type=float, default=None,
      help="semi: OHEML hard-example weight s: each unlabeled term of head 1 times "
           "s H(p')/log K + 1 - s (default 0.75)")
    a("--lambda-cons", type=float, default=None,
      help="semi: weight of the feature consistency on the samples the mask rejects (default 0.15)")
    a("--cons-temp", type=float, default=None,
      help="semi: student temperature tau_p of the feature consistency; the target's is tau_p/5 "
           "(default 0.09)")
    a("--semi-bank-size", type=int, default=None,
      help="semi: memory-bank slots M per class (default 128)")
    a("--semi-decay", type=float, default=None,
      help="semi: confidence decay factor of the bank slots not refilled since the last decay "
           "(default 0.99)")
    a("--semi-decay-step", type=int, default=None,
      help="semi: decay the bank every N steps (default 100; 200 for cifar100)")
    a("--semi-proto-temp", type=float, default=None,
      help="semi: temperature tau_tar of the semantic pseudo-labels softmax(-||f - mu_c|| / "
           "tau_tar) (default 0.1)")
    a("--semi-alpha", type=float, default=None,
      help="semi: blend p' = (1 - a_c) p + a_c q_proto, a_c = alpha (epoch / E) pi_hat_c "
           "(default 0.4)")
    a("--semi-ramp-epochs", type=int, default=None,
      help="semi: E of the blend's ramp epoch / E (capped at 1; default --epochs)")
    a("--semi-start-epoch", type=int, default=None,
      help="semi: first epoch (counting from 0) of OHEML, semantic pseudo-labels and the "
           "feature consistency (default 6: SeMi's code starts when epoch > 5)")
    a("--la-tau-x", type=float, default=None,
      help="semi: logit adjustment tau of head 2's labeled CE, z_b + tau log pi (default 2)")
    a("--la-tau-u", type=float, default=None,
      help="semi: logit adjustment tau of head 2's unlabeled teacher softmax(z_w - tau log pi) "
           "(default 2)")
    a("--semi-feature", choices=["pooled", "projection"], default=None,
      help="semi: the feature of the bank and the consistency: the pooled backbone feature "
           "(default, SeMi's code) or the L2-normalised 128-d projection")
    # ---------------------------------------------------------------- long-tailed (docs/long_tailed.md)
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
    # ---------------------------------------------------------------- active learning (docs/active_learning.md)
    a("--labeled-idx", default=None, metavar="FILE",
      help="the labeled set: training-set indices, one per line (.txt) or a 1-D .npy, e.g. from "
           "query.py; replaces --labels-per-class (an error with it); the whole training set "
           "stays unlabeled data")
    # ---------------------------------------------------------------- optimisation
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
    # ---------------------------------------------------------------- model and system
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
    return p


def labels_arg(v: str):
    """--labels-per-class: an integer, or 'all'."""
    if v == "all":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {v!r}") from None


def get_args(argv=None) -> argparse.Namespace:
    p = make_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return args


# ---------------------------------------------------------------- range rules

def finite(v) -> bool:
    return math.isfinite(v)


# (flags, rule, what the message says); a flag at None (not given, not applicable) is skipped
COUNT_RULES = [
    (("epochs", "steps_per_epoch", "batch_size", "eval_every", "log_every", "eval_batch_size"),
     lambda v: v >= 1, ">= 1"),
    (("mu", "save_every", "skip_nonfinite", "semi_start_epoch"), lambda v: v >= 0, ">= 0"),
    (("semi_bank_size", "semi_decay_step", "semi_ramp_epochs"), lambda v: v >= 1, ">= 1"),
]
VALUE_RULES = [
    (("lr", "pl_temp", "temp", "ccssl_temp", "bank_temp", "cons_temp", "semi_proto_temp"),
     lambda v: v > 0 and finite(v),
     "a positive number"),
    (("lambda_u", "lambda_c", "lambda_in", "lambda_cons", "la_tau_x", "la_tau_u"),
     lambda v: v >= 0 and finite(v), "a finite number >= 0"),
    (("labels_per_class",), lambda v: v == "all" or v >= 1, ">= 1 or all"),
    (("val_per_class",), lambda v: v >= 0, ">= 0"),
    (("bank_momentum", "smoothing_alpha", "hard_weight", "oheml_scale", "semi_decay", "semi_alpha"),
     lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("da_len",), lambda v: v >= 1, ">= 1"),
    (("threshold",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("low_weight",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("ema_decay",), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("logit_adjust",), lambda v: v >= 0 and finite(v), "a finite number >= 0"),
    (("imb_ratio_l", "imb_ratio_u"), finite, "a finite number"),
]
DERIVED_RULES = [  # checked once their defaults are resolved
    (("bn_momentum",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("wd",), lambda v: v >= 0 and finite(v), "a finite number >= 0"),
]


def check_ranges(p: argparse.ArgumentParser, args: argparse.Namespace, rules) -> None:
    for names, ok, what in rules:
        for name in names:
            v = getattr(args, name)
            if v is not None and not ok(v):
                p.error(f"--{name.replace('_', '-')} must be {what}, got {v}")


# ---------------------------------------------------------------- the checks

def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every value is checked before any data is loaded: one argparse error line each."""
    check_labeled_idx(p, args)
    check_long_tailed(p, args)
    check_ranges(p, args, COUNT_RULES)
    check_method_flags(p, args)
    check_ranges(p, args, VALUE_RULES)
    if args.hard_weight and args.epochs <= methods.HARD_WEIGHT_EPOCH:
        p.error(f"--hard-weight {args.hard_weight} has no effect with --epochs {args.epochs}: "
                f"the weighting starts after epoch {methods.HARD_WEIGHT_EPOCH}; use --epochs > "
                f"{methods.HARD_WEIGHT_EPOCH} or leave --hard-weight out")
    if not data.is_dataset_name(args.dataset):
        p.error(f"--dataset: unknown dataset {args.dataset!r}; use {data.DATASET_HELP}")
    check_own_data(p, args)
    try:
        parse_arch(args.arch)
    except ValueError as e:
        p.error(str(e))
    if args.seed < 0:
        p.error(f"--seed must be >= 0 (numpy and torch generators take non-negative seeds), "
                f"got {args.seed}")
    if args.eval_every > args.epochs:
        p.error(f"--eval-every {args.eval_every} is larger than --epochs {args.epochs}: the run "
                f"would be evaluated only once, at the end; use --eval-every <= {args.epochs}")
    if args.loss != "entropy" and (args.entropy_ratio is not None or args.entropy_epochs is not None):
        p.error("--entropy-ratio and --entropy-epochs apply to --loss entropy only")
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # optional extra, only for this flag
        except ImportError:
            p.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    resolve_defaults(p, args)
    check_ranges(p, args, DERIVED_RULES)
    if args.loss == "entropy":
        if not 0 < args.entropy_ratio <= 1:
            p.error(f"--entropy-ratio must be in (0, 1], got {args.entropy_ratio}")
        if not 0 <= args.entropy_epochs <= args.epochs:
            p.error(f"--entropy-epochs must be in [0, --epochs={args.epochs}], got {args.entropy_epochs}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device}")
    _, _, world_size = ddp.world()
    if world_size > 1 and (args.batch_size % world_size or (args.mu * args.batch_size) % world_size):
        p.error(f"--batch-size {args.batch_size} and mu x B = {args.mu * args.batch_size} must "
                f"divide by the {world_size} processes of torchrun")
    make_out(p, args)


def resolve_defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every default that depends on other flags, in one place (the method flags' defaults come
    from methods.FLAGS in check_method_flags, --labels-per-class's in check_long_tailed)."""
    if args.bn_momentum is None:  # 0.001 needs ~5,000 steps to converge the running statistics
        total = args.epochs * args.steps_per_epoch
        args.bn_momentum = min(0.1, max(BN_MOMENTUM, 5.0 / total))
    if args.wd is None:
        args.wd = PAPER_WD.get(args.dataset, 5e-4)
    if args.flip is None:  # a mirrored digit is another glyph (or none)
        args.flip = args.dataset not in data.DIGITS
    if args.threshold is None:  # SeMi's README runs 0.7
        args.threshold = 0.7 if args.loss == "semi" else 0.95
    if args.loss == "semi":
        if args.semi_decay_step is None:  # SeMi's README: 100 for CIFAR-10, 200 for CIFAR-100
            args.semi_decay_step = 200 if args.dataset == "cifar100" else 100
        if args.semi_ramp_epochs is None:
            args.semi_ramp_epochs = args.epochs
    if args.loss == "entropy":
        if args.entropy_ratio is None:
            args.entropy_ratio = PAPER_BETA.get((args.dataset, args.labels_per_class))
            if args.entropy_ratio is None:
                split = ("the long-tailed split" if args.lt_labeled else
                         f"the labeled set of {args.labeled_idx}" if args.labeled_idx else
                         f"fold {args.stl10_fold}" if args.stl10_fold is not None else
                         f"{args.labels_per_class} labels per class")
                p.error(f"--entropy-ratio is required for {args.dataset} with {split} (the paper "
                        f"gives beta only for CIFAR-10/100 with 4 or 25); e.g. --entropy-ratio 0.2")
        if args.entropy_epochs is None:  # [N&O]: the first 200 of 256 epochs
            args.entropy_epochs = round(args.epochs * 200 / 256)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.amp is None:
        args.amp = args.device.startswith("cuda")
    _, local_rank, world_size = ddp.world()
    if world_size > 1 and args.device.startswith("cuda"):
        args.device = f"cuda:{local_rank}"  # torchrun: one GPU per local rank
    if args.out is None:
        name = (os.path.splitext(os.path.basename(args.dataset[4:]))[0]
                if args.dataset.startswith("npz:") else args.dataset)
        if name.startswith("folder:"):
            name = os.path.basename(os.path.normpath(name[7:]))
        split = (f"lt{args.lt_labeled}-{args.lt_unlabeled}-{args.imb_ratio_l:g}-{args.imb_ratio_u:g}"
                 if args.lt_labeled else f"idx-{args.labeled_idx_sha256[:8]}"
                 if args.labeled_idx else f"fold{args.stl10_fold}"
                 if args.stl10_fold is not None else str(args.labels_per_class))
        split += f"_val{args.val_per_class}" if args.val_per_class else ""
        args.out = os.path.join("runs", f"{name}_{split}_{args.loss}_s{args.seed}")


def make_out(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Create --out and check that it is writable (one probe file per process, for torchrun)."""
    args.out_created = checkpoint.first_missing(args.out)  # removed again if the run fails at once
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, f".write_test.{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as e:
        p.error(f"--out {args.out} is not writable: {e.strerror}")


def check_own_data(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--image-size, --stl10-fold and --labels-per-class all go with the datasets they fit."""
    if args.image_size is not None:
        if not args.dataset.startswith("folder:"):
            p.error("--image-size applies to folder: datasets only (the others have one size)")
        if args.image_size < data.MIN_SIZE:
            p.error(f"--image-size must be >= {data.MIN_SIZE}, got {args.image_size}")
    if args.stl10_fold is not None:
        if args.dataset != "stl10":
            p.error("--stl10-fold applies to --dataset stl10 only")
        if not 0 <= args.stl10_fold <= 9:
            p.error(f"--stl10-fold must be in 0..9 (STL-10 has 10 folds), got {args.stl10_fold}")
        if args.labels_per_class is not None or args.labeled_idx or args.lt_labeled:
            p.error("--stl10-fold sets the labeled set; do not combine it with --labels-per-class, "
                    "--labeled-idx or the long-tailed flags")
    if args.labels_per_class == "all" and (args.labeled_idx or args.lt_labeled):
        p.error("--labels-per-class all does not combine with --labeled-idx or the long-tailed split")


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
    except (ValueError, OSError) as e:  # the file's content, not the command line: no usage block
        p.exit(2, f"{p.prog}: error: --labeled-idx: {e}\n")


def check_long_tailed(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The long-tailed flags go together and replace --labels-per-class."""
    lt = [args.lt_labeled, args.lt_unlabeled, args.imb_ratio_l]
    if args.labeled_idx is not None:
        return
    if all(v is None for v in lt + [args.imb_ratio_u]):
        if args.labels_per_class is None and args.stl10_fold is None:
            args.labels_per_class = 4
        return
    if any(v is None for v in lt):
        p.error("the long-tailed split needs --lt-labeled, --lt-unlabeled and --imb-ratio-l together")
    if args.labels_per_class is not None:
        p.error("--labels-per-class does not apply to the long-tailed split (--lt-labeled sets the "
                "labeled counts)")
    if args.imb_ratio_u is None:
        args.imb_ratio_u = args.imb_ratio_l
    if args.lt_labeled < 1:
        p.error(f"--lt-labeled (N1, labeled images of the head class) must be >= 1, got "
                f"{args.lt_labeled}")
    if args.lt_unlabeled < 1:
        p.error(f"--lt-unlabeled (M1, unlabeled images of the head class) must be >= 1, got "
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
