"""What must survive a crash: atomic writes, checkpoints, the resume rules, the non-finite guard.

Every file the project writes goes through `atomic_write` (a temporary file in the same folder,
fsync, then one rename), so a reader never sees half a file and a kill -9 leaves either the old
file or the new one. A run directory keeps two checkpoints, last.pt and prev.pt (the one before);
a torn or corrupt last.pt falls back to prev.pt. See docs/reliability.md.
"""
import fcntl
import glob
import json
import math
import os
import sys
from typing import IO, Callable

import numpy as np
import torch

CKPT_NAMES = ("last.pt", "prev.pt")  # newest first; prev.pt is the one before last.pt
BEST_NAME = "best_val.pt"  # the checkpoint of the best validation accuracy (--val-per-class)
# a checkpoint is resumed only if these match (the rest, e.g. --device or --log-every, may change)
CONFIG_KEYS = ("dataset", "labels_per_class", "loss", "seed", "arch", "epochs", "steps_per_epoch",
               "batch_size", "mu", "lr", "wd", "threshold", "pl_temp", "temp", "low_weight",
               "entropy_ratio", "entropy_weighting", "entropy_epochs", "ema_decay",
               "bn_momentum", "channels_last", "wrn_variant", "pair_weight", "lambda_u", "lambda_c",
               "ccssl_temp", "lambda_in", "bank_momentum", "bank_temp", "smoothing_alpha",
               "da_len", "lt_labeled", "lt_unlabeled", "imb_ratio_l", "imb_ratio_u", "hard_weight",
               "labeled_idx_sha256", "logit_adjust", "flip", "val_per_class", "image_size",
               "stl10_fold", "oheml_scale", "lambda_cons", "cons_temp", "semi_bank_size",
               "semi_decay", "semi_decay_step", "semi_proto_temp", "semi_alpha",
               "semi_ramp_epochs", "semi_start_epoch", "la_tau_x", "la_tau_u", "semi_feature")
# free to change on resume: where things are, how often to log / save / evaluate, speed-only
# switches (--data-device gives the same results), and what the device / precision checks of
# check_resumable already cover
FREE_ON_RESUME = ("data_dir", "out", "labeled_idx", "device", "amp", "compile", "eval_every",
                  "log_every", "tensorboard", "save_every", "skip_nonfinite", "eval_batch_size",
                  "debug_nan_step", "data_device")
# flags added later, at the value that reproduces what runs did before they existed: a run's
# saved arguments leave them out at that value (logs.public_args), so the checkpoint and
# result.json of every older configuration stay as they were, and a missing key reads as it
OLD_DEFAULTS = {"flip": True, "val_per_class": 0, "data_device": "device", "image_size": None,
                "stl10_fold": None}
# a key added to CONFIG_KEYS later: the value that a checkpoint from before it was trained with
RESUME_DEFAULTS = {"logit_adjust": 1.0, **OLD_DEFAULTS}


class CheckpointError(Exception):
    pass


def fail(msg: str, prog: str = "train.py") -> None:
    sys.exit(f"{prog}: error: {msg}")


# ---------------------------------------------------------------- atomic writes

def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """write(fh) into PATH.tmp-PID in PATH's folder, fsync, rename over PATH. On any failure the
    temporary file is removed and PATH is untouched."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def finite_json(obj):
    """obj with every non-finite float (NaN, +-inf) replaced by None: JSON has no such numbers
    (Python would write the non-standard NaN / Infinity), and a null says "undefined"."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps_json(obj, **kw) -> str:
    """json.dumps for every JSON file the project writes: standard JSON only (allow_nan=False),
    non-finite floats written as null (finite_json)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kw)


def remove_stale_temps(path: str) -> None:
    """Remove PATH.tmp-PID files that a killed writer left behind (call it holding the lock of
    PATH's folder, so that no live writer owns one)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp-*"):
        try:
            os.remove(tmp)
        except OSError:
            pass


def write_text(path: str, text: str, echo: bool = False) -> None:
    """A text file, written atomically; printed too with echo."""
    atomic_write(path, lambda fh: fh.write(text.encode()))
    if echo:
        print(text)


def fsync_dir(path: str) -> None:
    """Make a rename inside PATH durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- checkpoints

def read_checkpoint(path: str) -> tuple[dict, str]:
    """Load OUT/last.pt (falling back to OUT/prev.pt if last.pt is unreadable) or a given file,
    with weights_only=True so that a checkpoint cannot run code. Returns (state, file)."""
    files = [os.path.join(path, n) for n in CKPT_NAMES] if os.path.isdir(path) else [path]
    files = [f for f in files if os.path.exists(f)]
    if not files:
        raise CheckpointError(f"no checkpoint found at {path}")
    for f in files:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and all(k in state for k in ("args", "ema", "step")):
                return state, f
        except Exception:  # noqa: BLE001 - truncated, corrupt or unsafe: all the same to us
            pass
        if len(files) > 1 and f != files[-1]:
            print(f"warning: checkpoint {f} is unreadable (truncated or corrupt); "
                  f"falling back to {files[files.index(f) + 1]}", file=sys.stderr)
    if not os.path.isdir(path):  # a file named on the command line: say what it is instead
        raise CheckpointError(f"{path} is not a checkpoint of train.py ({what_file(path)}); "
                              f"expected a run directory (train.py --out) or its last.pt")
    names = " and ".join(files)
    raise CheckpointError(f"no readable checkpoint: {names} {'are' if len(files) > 1 else 'is'} "
                          f"truncated, corrupt or not a plain-tensor checkpoint; delete "
                          f"{'them' if len(files) > 1 else 'it'} to start the run over")


def what_file(path: str) -> str:
    """What a file that is not a checkpoint looks like, for the error message."""
    import zipfile
    name = os.path.basename(path)
    if name == "metrics.jsonl" or name.endswith(".jsonl"):
        return "a metrics file (JSON lines)"
    if name.endswith(".json"):
        return "a JSON file (a run's result.json or a query record?)"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if "x_train.npy" in names:
            return "a dataset (npz: archive)"
        if any(n.endswith("data.pkl") for n in names):
            return "a torch file without a run's state (a bare state_dict?)"
    except (zipfile.BadZipFile, OSError):
        pass
    return "truncated, corrupt or not a plain-tensor file"


def kept(out: str) -> str:
    """What a failing run leaves behind, said truthfully."""
    if os.path.exists(os.path.join(out, "last.pt")):
        return f"the last good checkpoint in {out} is kept"
    return f"no checkpoint had been written yet in {out}"


def save_checkpoint(out: str, state: dict, best: bool = False) -> None:
    """Atomic: write last.pt.tmp, fsync, keep the old last.pt as prev.pt, rename. best: also
    write the same state to best_val.pt (atomically), the checkpoint chosen by validation."""
    path, tmp, prev = (os.path.join(out, n) for n in ("last.pt", "last.pt.tmp", "prev.pt"))
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if best:
            atomic_write(os.path.join(out, BEST_NAME), lambda fh: torch.save(state, fh))
        if os.path.exists(path):
            os.replace(path, prev)
        os.replace(tmp, path)
        fsync_dir(out)
    except Exception as e:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
        try:
            os.remove(tmp)
        except OSError:
            pass
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:120]
        fail(f"could not write checkpoint {path}: {reason} (disk full or not writable?); "
             f"{kept(out).replace('last good', 'previous')}. Free space and run the same "
             f"command again to resume")


def load_checkpoint(out: str) -> tuple[dict | None, str | None]:
    """The newest readable checkpoint of OUT, or (None, None) for a fresh run. A corrupt last.pt
    is moved aside to last.pt.corrupt when prev.pt is used instead, so that the next save cannot
    rotate the unreadable file over the only good backup."""
    try:
        state, f = read_checkpoint(out)
    except CheckpointError as e:
        if any(os.path.exists(os.path.join(out, n)) for n in CKPT_NAMES):
            fail(str(e))
        refuse_finished(out)  # a fresh run, unless the folder holds a finished one
        return None, None
    last = os.path.join(out, "last.pt")
    if f.endswith("prev.pt") and os.path.exists(last):
        os.replace(last, last + ".corrupt")
        print(f"moved the unreadable {last} aside to last.pt.corrupt; resuming from {f}",
              file=sys.stderr)
    return state, f


RUN_FILES = ("metrics.jsonl", "result.json", "pl_confusion.npy")  # written with atomic_write


def remove_run_temps(out: str) -> None:
    """NAME.tmp-PID of the run's files and last.pt.tmp, left by a writer killed mid-write."""
    for name in RUN_FILES:
        remove_stale_temps(os.path.join(out, name))
    tmp = os.path.join(out, "last.pt.tmp")
    if os.path.exists(tmp):
        os.remove(tmp)


def load_checkpoint_all_ranks(out: str, rank: int, world: int) -> tuple[dict | None, str | None]:
    """Rank 0 reads (and may move a corrupt last.pt aside) first; the other ranks then read the
    same file, so every rank resumes from the same state. Rank 0, the only writer (it holds the
    lock), first removes the temporary files that a killed run left behind."""
    if rank == 0:
        remove_run_temps(out)
    if world == 1:
        return load_checkpoint(out)
    import torch.distributed as dist
    if rank == 0:
        found = load_checkpoint(out)
    dist.barrier()
    if rank != 0:
        found = load_checkpoint(out)
    return found


# ---------------------------------------------------------------- resume rules

def check_resumable(s: dict, args, dev: torch.device, amp_dtype, world: int) -> None:
    """The checkpoint's configuration (CONFIG_KEYS) must match the command's. What can change on
    resume: the device index, bf16 autocast on/off. What cannot: the device type (CPU and CUDA
    generators have different states) and fp16, whose GradScaler state (the loss scale) has no
    counterpart in a bf16 or fp32 run and vice versa; nor the number of processes."""
    then = {k: s["args"].get(k, RESUME_DEFAULTS.get(k)) for k in CONFIG_KEYS}
    diffs = [f"{k}: checkpoint {then[k]!r}, now {getattr(args, k)!r}"
             for k in CONFIG_KEYS if then[k] != getattr(args, k)]
    if diffs:
        fail(f"{args.out} holds a run with a different configuration ({'; '.join(diffs)}); "
             "use another --out or the original arguments")
    if s.get("world_size", 1) != world:
        fail(f"{args.out} was trained with {s.get('world_size', 1)} process(es) and cannot "
             f"resume with {world}: the global batch is split differently; resume with "
             f"torchrun --nproc_per_node={s.get('world_size', 1)}, or start a new --out")
    was = s.get("device_type", "cpu")
    if was != dev.type:
        fail(f"{args.out} was trained on {was} and cannot resume on {dev.type} (the "
             f"random generators' states differ between device types); resume with "
             f"--device {was}, or start a new run with another --out")
    fp16_then, fp16_now = s.get("amp_dtype") == str(torch.float16), amp_dtype == torch.float16
    if fp16_then != fp16_now:
        fail(f"{args.out} was trained with amp {s.get('amp_dtype')} and now it would be "
             f"{amp_dtype}: fp16 runs keep a GradScaler state that other precisions do "
             f"not have; resume on the same kind of GPU, or start a new run with another --out")


def check_same_split(s: dict, out: str, labeled_idx, unlabeled_idx, val_idx,
                     data_id: dict | None = None) -> None:
    """The data (data.fingerprint: sizes and a digest of every image and label) and the
    checkpoint's labeled, unlabeled and validation indices must be the ones the data gives now
    (checkpoints from before a set was saved have none: the unlabeled set was then the whole
    training set, and there was no validation split; nor a fingerprint)."""
    then = s.get("data")
    if data_id is not None and then is not None and then["digest"] != data_id["digest"]:
        sizes = "" if then["sizes"] == data_id["sizes"] else (
            f": the checkpoint's had {then['sizes']}, this one has {data_id['sizes']}")
        changed = [k for k in ("train", "test", "unlabeled")
                   if then["digest"].get(k) != data_id["digest"].get(k)]
        fail(f"{out}: the dataset's {' and '.join(changed)} images or labels are not "
             f"the ones this run was trained on{sizes} (or they decode differently, e.g. after a "
             f"Pillow upgrade); resume with the original data, or start a new run with another "
             f"--out")
    same_ulb = "unlabeled_idx" not in s or np.array_equal(s["unlabeled_idx"].numpy(), unlabeled_idx)
    same_ulb &= np.array_equal(s.get("val_idx", torch.zeros(0)).numpy(), val_idx)
    if not np.array_equal(s["labeled_idx"].numpy(), labeled_idx) or not same_ulb:
        fail(f"{out}: the labeled split differs from the checkpoint's (dataset changed?)")


# ---------------------------------------------------------------- the non-finite guard

class NonFiniteGuard:
    """Counts non-finite losses on the device, without a host sync per step; `check` (at logging
    and saving time) stops the run before a poisoned state is saved. With --skip-nonfinite N the
    step itself syncs and skips up to N bad steps instead."""

    def __init__(self, dev: torch.device, skip_max: int, out: str):
        self.count = torch.zeros(2, device=dev)  # [count, first bad step + 1]
        self.bad_loss = torch.zeros((), device=dev)
        self.skip_max, self.out, self.skipped = skip_max, out, 0

    def skip(self, loss: torch.Tensor, step: int) -> bool:
        """True when this step's loss is not finite and should be skipped (opt-in host sync)."""
        bad = ~torch.isfinite(loss)
        if self.skip_max and bool(bad):
            self.skipped += 1
            print(f"step {step + 1}: non-finite loss {loss.item()}, step skipped "
                  f"({self.skipped} of at most {self.skip_max})", flush=True)
            if self.skipped > self.skip_max:
                fail(f"more than --skip-nonfinite={self.skip_max} non-finite losses; last at "
                     f"step {step + 1}; {kept(self.out)}")
            return True
        first = (self.count[0] == 0) & bad
        self.bad_loss = torch.where(first, loss.detach(), self.bad_loss)
        self.count += torch.stack([bad.to(self.count.dtype),
                                   first.to(self.count.dtype) * (step + 1)])
        return False

    def check(self) -> None:
        count, first = self.count.tolist()
        if count:
            fail(f"non-finite loss at step {int(first)} (loss = {self.bad_loss.item()}, "
                 f"{int(count)} non-finite step(s) since); stopped without saving, "
                 f"{kept(self.out)}. Lower --lr, try --no-amp, or pass --skip-nonfinite N to skip "
                 f"such steps")


# ---------------------------------------------------------------- the output folder

LOCK_NAME = ".lock"


class DirLock:
    """One writer per folder: an exclusive fcntl.flock on FOLDER/.lock, held while the `with`
    block runs. The kernel drops the lock when the process dies (kill -9 included), so a crash
    never leaves a stale lock; the file itself stays and only holds the last holder's pid."""

    def __init__(self, folder: str, prog: str = "train.py", held: bool = True):
        self.folder, self.prog, self.fd, self.held = folder, prog, None, held

    def __enter__(self) -> "DirLock":
        if not self.held:  # e.g. torchrun ranks other than 0, which write nothing to the folder
            return self
        path = os.path.join(self.folder, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            fail(f"cannot create the lock file {path}: {e.strerror}", self.prog)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            fail(f"{self.folder} is in use by another process (pid {holder}); wait for it to "
                 f"end, or stop it, before writing there", self.prog)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the lock
            self.fd = None


def refuse_finished(out: str) -> None:
    """A finished run (result.json) without a checkpoint to resume from would start over and
    replace its results: refuse, and say how to start over on purpose."""
    if os.path.exists(os.path.join(out, "result.json")):
        fail(f"{out} holds a finished run (result.json) but no checkpoint to resume from; "
             f"a finished run is never overwritten: to start over, delete {out} (or its "
             f"result.json), or give another --out")


def first_missing(path: str) -> str | None:
    """The outermost folder of path that does not exist yet (None if path exists)."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path):
        path, top = os.path.dirname(path), path
    return top


def remove_if_empty(out: str, top: str | None) -> None:
    """A run that failed before its first step leaves no empty --out behind, nor the empty
    parent folders (e.g. runs/) that creating it made (top: the outermost one it created)."""
    path = os.path.abspath(out)
    ours = top and path.startswith(top) and os.path.isdir(path)
    if ours and os.listdir(path) == [LOCK_NAME]:  # only the lock file: nothing else was written
        os.remove(os.path.join(path, LOCK_NAME))
    while top and path.startswith(top):
        try:
            os.rmdir(path)  # only if empty
        except OSError:
            return
        if path == top:
            return
        path = os.path.dirname(path)
