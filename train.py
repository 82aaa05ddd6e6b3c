"""Train WRN-28-2 with the unified contrastive loss [G] (--loss base) or its entropy-weighted,
pair-weighted version [N&O] (--loss entropy); the peers (FixMatch, CCSSL, SimMatch, SeMi) under
the same protocol. This file is the recipe: the state of a run, one training step, the loop.

    python train.py --dataset cifar10 --labels-per-class 4 --loss entropy

The [N&O] path: main -> Run.train_step -> methods.contrastive_step -> losses.pair_weighted_supcon
(Eq. 8). The command line is config.py, checkpoints and resume rules checkpoint.py, what is logged
logs.py. Re-running the same command with the same --out resumes from the last checkpoint.
"""
import copy
import math
import os
import sys
import time

import numpy as np
import torch

import checkpoint
import config
import data
import ddp
import logs
import methods
from checkpoint import fail
from evaluate import eval_metrics, head1_metrics, outputs_all, val_metrics
from model import Encoder


# ---------------------------------------------------------------- small pieces of the step

def amp_dtype_for(dev: torch.device) -> torch.dtype:
    """bf16 where the device has it natively (CPU; CUDA compute capability >= 8.0), else fp16
    with a GradScaler. torch.cuda.is_bf16_supported() alone also counts emulation (slow, and it
    would make the fp16 path unreachable)."""
    if dev.type != "cuda":
        return torch.bfloat16
    major, _ = torch.cuda.get_device_capability(dev)
    return torch.bfloat16 if major >= 8 else torch.float16


def lr_at(step: int, total: int, lr: float) -> float:
    """Cosine decay of FixMatch / [G]: lr cos(7 pi k / (16 K)), k the step (not the epoch)."""
    return lr * math.cos(7 * math.pi * step / (16 * total))


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.SGD:
    """SGD, Nesterov momentum 0.9; weight decay on >= 2-D tensors only (not BN, biases)."""
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


# ---------------------------------------------------------------- the state of a run

class Run:
    """Everything a step touches, and what a checkpoint must hold to resume it exactly."""

    def __init__(self, args):
        self.args, dev = args, torch.device(args.device)
        self.dev = dev
        self.rank, _, self.world = ddp.world()
        if self.world > 1:
            ddp.init(dev.type)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convs once
        # data: on the device as uint8 (or in pinned host memory, --data-device cpu), augmented
        # on the device in whole batches; images without labels carry the label -1
        try:
            ds = data.load_dataset(args.dataset, args.data_dir, args.image_size)
            self.k = ds["num_classes"]
            self.labeled_idx, self.unlabeled_idx, self.val_idx = data.make_splits(ds, args)
        except (ValueError, RuntimeError, OSError) as e:
            fail(str(e))
        self.classes, self.data_id = ds["classes"], data.fingerprint(ds)
        self.mean, self.std = data.dataset_stats(ds)
        x_pool, y_pool = data.training_pool(ds)
        self.n_no_label = len(x_pool) - len(ds["x_train"])  # images without a label
        home, pin = data.data_home(args.data_device, dev)
        self.x_train = data.to_tensor_images(x_pool, home, pin)
        self.y_train = torch.from_numpy(y_pool).to(dev)
        self.x_test = data.to_tensor_images(ds["x_test"], home, pin)
        self.y_test = torch.from_numpy(ds["y_test"]).to(dev)
        self.x_val, self.y_val = self.x_train[self.val_idx], self.y_train[self.val_idx]
        self.lb, self.ulb = (torch.from_numpy(i).to(dev)
                             for i in (self.labeled_idx, self.unlabeled_idx))
        self.labeled_counts = np.bincount(ds["y_train"][self.labeled_idx], minlength=self.k).tolist()
        self.norm = data.Normalize(self.mean, self.std, dev, channels_last=args.channels_last)
        # model, EMA copy, optimiser; the seed fixes the initialisation
        torch.manual_seed(args.seed)
        self.model = Encoder(self.k, args.arch, bn_momentum=args.bn_momentum,
                             classifier=args.loss in methods.CLASSIFIER, variant=args.wrn_variant,
                             in_channels=self.x_train.shape[1],
                             balanced=args.loss in methods.BALANCED_HEAD).to(dev)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.world > 1 and dev.type == "cuda":  # BN over the global batch, as [G] ran it
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.forward = self.model
        if self.world > 1:  # FixMatch does not use the projection head: DDP must allow that
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None,
                find_unused_parameters=args.loss in ("fixmatch", "semi"))
        if args.compile:
            self.forward = torch.compile(self.forward)
        self.opt = make_optimizer(self.model, args)
        self.amp_dtype = amp_dtype_for(dev) if args.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # random streams: augmentation, labeled and unlabeled samplers, method state
        self.g_aug = torch.Generator(dev).manual_seed(args.seed + 1)
        self.sampler_lb = data.IndexSampler(len(self.lb), args.batch_size,
                                            torch.Generator(dev).manual_seed(args.seed + 2))
        self.sampler_ulb = (data.IndexSampler(len(self.ulb), args.mu * args.batch_size,
                                              torch.Generator(dev).manual_seed(args.seed + 3))
                            if args.mu > 0 else None)
        self.step_fn = methods.STEPS[args.loss]
        self.n_strong = methods.STRONG_VIEWS[args.loss]
        self.method_state = methods.make_state(args.loss, self.y_train[self.lb], self.k, args.da_len,
                                               torch.Generator(dev).manual_seed(args.seed + 4),
                                               args, self.model.backbone.out_dim)
        # progress and what is logged
        self.total, self.step = args.epochs * args.steps_per_epoch, 0
        self.history: list[float] = []  # test accuracy of each evaluation
        self.val_history: list[float] = []  # validation accuracy of each (--val-per-class)
        self.last_test: dict = {}  # the metrics of the last evaluation
        self.elapsed = 0.0  # training seconds over all sessions
        self.stats, self.pl_confusion = self.new_interval()
        self.guard = checkpoint.NonFiniteGuard(dev, args.skip_nonfinite, args.out)

    def new_interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed accumulators of an evaluation interval: the statistics (logs.STATS) and the
        pseudo-label confusion (confident, entropy-selected, unconfident) x true x argmax class."""
        return (torch.zeros(len(logs.STATS), device=self.dev, dtype=torch.float64),
                torch.zeros(3, self.k, self.k, device=self.dev, dtype=torch.float64))

    # ---------------------------------------------------------------- the training step

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """[weak(x_lb); weak(x_ulb); strong1(x_ulb) (; strong2(x_ulb))], normalised, on the device,
        with the labels, the labeled images' positions in the labeled set, and the unlabeled
        images' true labels (for the diagnostics only)."""
        pos_lb = self.sampler_lb.next()
        idx, flip = self.lb[pos_lb], self.args.flip
        x_lb, y_lb = data.gather(self.x_train, idx, self.dev), self.y_train[idx]
        parts = [data.weak(x_lb, self.g_aug, flip=flip)]
        y_ulb, n_ulb = None, 0
        if self.sampler_ulb is not None:
            idx_ulb = self.ulb[self.sampler_ulb.next()]
            x_ulb, y_ulb = data.gather(self.x_train, idx_ulb, self.dev), self.y_train[idx_ulb]
            n_ulb = len(idx_ulb)
            parts += [data.weak(x_ulb, self.g_aug, flip=flip), *data.strong(
                torch.cat([x_ulb] * self.n_strong), self.g_aug, flip=flip).split(n_ulb)]
        self.view_sizes = [len(v) for v in parts]
        if self.world > 1:  # the same global batch on every rank; each forwards its own slice
            parts = ddp.local_views(parts, self.rank, self.world)
        return self.norm(torch.cat(parts)), y_lb, pos_lb, y_ulb, n_ulb

    def train_step(self) -> None:
        a = self.args
        x, y_lb, pos_lb, y_ulb, n_ulb = self.batch()
        # one forward pass over every view: BN statistics over the whole concatenation, as [G]
        with torch.autocast(self.dev.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            z, logits = self.forward(x)
        z, logits = (ddp.gather_views(t, self.view_sizes, self.world) for t in (z, logits))
        out = methods.split_views(z.float(), None if logits is None else logits.float(), len(y_lb),
                                  n_ulb, self.n_strong, y_lb, pos_lb, y_ulb)
        # the method's loss (methods.py); its targets come from the online model's weak view
        loss, diag, confusion = self.step_fn(out, self.model, a, self.step, self.method_state)
        if self.step == a.debug_nan_step:  # test-only fault injection
            loss = loss * float("nan")
        if self.guard.skip(loss, self.step):
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            return
        # the update: lr by step, optimiser step, then the EMA of the updated weights
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
        scores, _, h = outputs_all(self.ema, self.x_test, self.norm, self.args.eval_batch_size)
        if self.args.loss not in methods.CLASSIFIER:
            scores = scores / self.args.pl_temp
        m = eval_metrics(scores, self.y_test, self.labeled_counts, self.args.logit_adjust)
        m |= head1_metrics(self.ema, h, self.y_test, self.labeled_counts, self.args.logit_adjust)
        # val_acc with --val-per-class
        return m | val_metrics(self.ema, self.x_val, self.y_val, self.norm, self.args.eval_batch_size)

    def lr(self) -> float:
        """The learning rate of the last step, as the optimiser has it."""
        return self.opt.param_groups[0]["lr"]

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        return {
            "format": 1, "step": self.step, "args": logs.public_args(self.args), "cwd": os.getcwd(),
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
            "val_idx": torch.from_numpy(self.val_idx), "val_history": list(self.val_history),
            "mean": self.mean, "std": self.std, "classes": list(self.classes), "data": self.data_id,
            "history": list(self.history), "elapsed": self.elapsed, "last_test": self.last_test,
            "stats": self.stats.cpu(), "pl_confusion": self.pl_confusion.cpu(),
            "skipped": self.guard.skipped,
            "method_state": self.method_state.state_dict() if self.method_state else {},
        }

    def load_state_dict(self, s: dict) -> None:
        checkpoint.check_resumable(s, self.args, self.dev, self.amp_dtype, self.world)
        checkpoint.check_same_split(s, self.args.out, self.labeled_idx, self.unlabeled_idx,
                                    self.val_idx, self.data_id)
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
        self.val_history = list(s.get("val_history", []))
        self.last_test = s.get("last_test", {})
        self.stats = s["stats"].to(self.dev)
        self.pl_confusion = s["pl_confusion"].to(self.dev)
        self.guard.skipped = s["skipped"]
        if self.method_state:
            self.method_state.load_state_dict(s["method_state"])

    def save(self, board: logs.Board, best: bool = False) -> None:
        """Checkpoint (never a non-finite state; best: also as OUT/best_val.pt). TensorBoard's points
        up to this step are flushed first: a resume from it neither loses nor repeats any."""
        self.guard.check()
        board.flush()
        checkpoint.save_checkpoint(self.args.out, self.state_dict(), best)


# ---------------------------------------------------------------- the recipe

def main(argv=None) -> dict:
    args = config.get_args(argv)
    # one writer per run directory: rank 0 alone writes to --out, so it alone holds the lock
    with checkpoint.DirLock(args.out, held=ddp.world()[0] == 0):
        return train(args)


def train(args) -> dict:
    # set up: data, model, optimiser, samplers; resume if --out holds a checkpoint
    try:
        run = Run(args)
        # a finished run without a checkpoint is refused: a finished run is never overwritten
        state, f = checkpoint.load_checkpoint_all_ranks(args.out, run.rank, run.world)
    except SystemExit:
        checkpoint.remove_if_empty(args.out, getattr(args, "out_created", None))
        raise
    if run.rank != 0:  # rank 0 alone prints, evaluates, logs and checkpoints
        sys.stdout = open(os.devnull, "w")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if state is not None:
        run.load_state_dict(state)
        if run.rank == 0:
            logs.truncate_metrics(metrics_path, run.step)  # the lines after the checkpoint come again
        print(f"resumed from {f} at step {run.step}/{run.total}")
    elif os.path.exists(metrics_path) and run.rank == 0:
        os.remove(metrics_path)  # a fresh run; old metrics without a checkpoint are stale
    ipb = args.batch_size * (1 + (1 + run.n_strong) * args.mu)  # images per step
    print(logs.start_line(run, ipb), flush=True)
    logs.warn_unlabeled_classes(run.classes, run.labeled_counts)  # allowed, but worth knowing
    board = logs.Board(args.out, run.step, args.tensorboard and run.rank == 0)

    # the loop: a step; a progress line every --log-every steps; every --eval-every epochs an
    # evaluation of the EMA model, a metrics line and a checkpoint
    t_session, elapsed0 = time.perf_counter(), run.elapsed
    steps_per_eval = args.eval_every * args.steps_per_epoch
    t_log, step_log = time.perf_counter(), run.step
    try:
        while run.step < run.total:
            run.train_step()
            run.elapsed = elapsed0 + time.perf_counter() - t_session
            if run.step % args.log_every == 0 or run.step == run.total:
                run.guard.check()  # the only host syncs: here and at evaluation
                now = time.perf_counter()
                rate = (run.step - step_log) / max(now - t_log, 1e-9)
                print(logs.progress_line(run, run.lr(), rate, ipb), flush=True)
                board.scalars("train", logs.train_scalars(run, rate * ipb), run.step)
                t_log, step_log = now, run.step
            if run.rank != 0:  # the other ranks only train
                continue
            t_pause = time.perf_counter()
            if run.step % steps_per_eval == 0 or run.step == run.total:
                run.guard.check()
                run.last_test = run.evaluate()
                best = logs.record(run, run.last_test)  # test (and validation) history
                m = logs.epoch_metrics(run, run.last_test, run.lr())
                logs.append_jsonl(metrics_path, m)
                print(logs.eval_line(m), flush=True)
                logs.write_confusion(args.out, run.pl_confusion)
                board.scalars("eval", m, run.step)
                run.stats, run.pl_confusion = run.new_interval()
                run.save(board, best)
            elif args.save_every and run.step % args.save_every == 0:
                run.save(board)
            t_log += time.perf_counter() - t_pause  # img/s counts training time only
    except KeyboardInterrupt:
        fail(f"interrupted at step {run.step}; run the same command again to resume from the "
             f"last checkpoint in {args.out}")
    board.close()
    res = logs.write_result(run) if run.rank == 0 else {}
    if run.rank == 0:
        print(logs.done_line(res, args.out), flush=True)
    ddp.close()  # every rank leaves together, the process group torn down
    return res


if __name__ == "__main__":
    main()
