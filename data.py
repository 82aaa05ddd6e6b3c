"""Datasets, the labeled/unlabeled split, index sampling and batched on-device augmentation.

The training images live on the training device as uint8 (N, 3, H, W). A step draws index
batches and augments whole batches at once with per-image random parameters (docs/method.md, docs/speed.md):

    weak   alpha : horizontal flip, then translation by up to 4 px with reflect padding
    strong A     : weak, then RandAugment as in USB / [G] (3 ops drawn with replacement from 14,
                   each always applied, magnitude uniform in its range), then Cutout

The 14 ops fall in three families that each run as one batched operation:
    affine (Rotate, ShearX/Y, TranslateX/Y): one gather with a per-image affine map, with PIL's
        nearest-neighbour arithmetic (double-precision coefficients; 16.16 fixed point for
        rotations and shears), black fill;
    enhance (Brightness, Color, Contrast, Sharpness): PIL ImageEnhance, i.e. a blend
        degenerate + v (img - degenerate) truncated to uint8, with a per-image degenerate image;
    lookup (AutoContrast, Equalize, Posterize, Solarize): per-pixel maps; Solarize and Posterize
        as bitwise uint8 arithmetic, the other two as per-image, per-channel 256-entry tables.
Images stay uint8 between ops, so every op quantises like PIL's and moves a quarter of the
bytes a float pipeline would; only the enhance ops compute in float32.
On CUDA each family runs over the whole batch (images with another op get the identity
parameters), so there is no host synchronisation; on CPU the images are sorted by op once per
slot and each op runs on its own contiguous slice (the five affine ops on one), since the sort's
one sync costs nothing there.
"""
import functools
import hashlib
import math
import os
import re
import shutil
import socket

import numpy as np
import torch

# ---------------------------------------------------------------- datasets

CIFAR_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def load_dataset(name: str, data_dir: str = "data") -> dict:
    """`cifar10`, `cifar100` (torchvision, downloaded into data_dir) or `npz:PATH`.

    Returns a dict with numpy arrays x_train (N, H, W, 3) uint8, y_train (N,) int64, x_test,
    y_test, and `classes` (list of names) and `num_classes`.
    """
    if name.startswith("npz:"):
        return load_npz(name[4:])
    if name in CIFAR_URLS:
        return load_cifar(name, data_dir)
    raise ValueError(f"unknown dataset {name!r}: use cifar10, cifar100 or npz:PATH")


def load_cifar(name: str, data_dir: str) -> dict:
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = os.path.join(os.path.abspath(data_dir), CIFAR_FOLDERS[name])
    advice = (f"Download {CIFAR_URLS[name]} and extract it into {os.path.abspath(data_dir)} (so "
              f"that {folder}/ exists), then run again with --data-dir {data_dir}")
    if not os.path.isdir(folder):
        created = not os.path.exists(data_dir)
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # a blocked network should fail, not hang
        try:
            cls(data_dir, train=True, download=True)
        except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
            if created:  # leave nothing behind: no empty folder, no partial archive
                shutil.rmtree(data_dir, ignore_errors=True)
            raise RuntimeError(f"{name} is not in {os.path.abspath(data_dir)} and could not be "
                               f"downloaded ({type(e).__name__}: {e}). {advice}") from None
        finally:
            socket.setdefaulttimeout(old_timeout)
    try:
        train, test = cls(data_dir, train=True), cls(data_dir, train=False)
    except RuntimeError as e:
        raise RuntimeError(f"{folder} is incomplete or corrupt ({e}). Delete it and run again to "
                           f"download it, or: {advice}") from None
    return {"x_train": np.asarray(train.data, dtype=np.uint8),
            "y_train": np.asarray(train.targets, dtype=np.int64),
            "x_test": np.asarray(test.data, dtype=np.uint8),
            "y_test": np.asarray(test.targets, dtype=np.int64),
            "classes": list(train.classes), "num_classes": len(train.classes)}


MIN_SIZE = 5  # the weak augmentation's 4-pixel reflect padding needs images of at least 5 x 5
NPZ_HELP = ("expected an archive written by np.savez(path, x_train=..., y_train=..., x_test=..., "
            "y_test=..., classes=...)")


def _npz_member(f, path: str, key: str) -> np.ndarray:
    """One array of an open .npz, with every way of failing turned into a ValueError."""
    try:
        return f[key]
    except ValueError as e:  # allow_pickle=False refuses object arrays
        raise ValueError(f"{path}: array {key!r} cannot be read without pickle ({e}); store it as "
                         f"plain numbers or strings, e.g. np.array(names, dtype=str)") from None
    except Exception as e:  # noqa: BLE001 - zipfile.BadZipFile (bad CRC), EOFError, OSError ...
        raise ValueError(f"{path}: array {key!r} is corrupt ({type(e).__name__}: {e}); "
                         f"write the file again") from None


def load_npz(path: str) -> dict:
    """A dataset as arrays x_train (N,H,W,3) uint8, y_train (N,) int in [0,K), x_test, y_test,
    optional classes. Every inconsistency is a ValueError that says what to fix."""
    if os.path.isdir(path):
        raise ValueError(f"npz dataset {path!r} is a directory; {NPZ_HELP}")
    if not os.path.isfile(path):
        raise ValueError(f"npz dataset {path!r} does not exist")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001 - numpy's own message here is misleading ("pickled data")
        raise ValueError(f"{path!r} is not an .npz archive; {NPZ_HELP}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} is a single .npy array, not an .npz archive; {NPZ_HELP}")
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing}; expected x_train, y_train, x_test, "
                         "y_test (and optional classes)")
    d = {k: _npz_member(f, path, k) for k in ("x_train", "y_train", "x_test", "y_test")}
    for split in ("train", "test"):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{path}: x_{split} must have shape (N, H, W, 3), got {x.shape} "
                             "(for grayscale use np.repeat(x[..., None], 3, -1))")
        if x.dtype != np.uint8:
            raise ValueError(f"{path}: x_{split} must be uint8 in 0..255, got {x.dtype}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{path}: y_{split} must have shape ({len(x)},), got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: y_{split} must be integers, got {y.dtype}")
        if len(x) == 0:
            raise ValueError(f"{path}: x_{split} is empty")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"{path}: images are {x.shape[1]} x {x.shape[2]}; the augmentation "
                             f"needs at least {MIN_SIZE} x {MIN_SIZE} pixels")
    if d["x_train"].shape[1:] != d["x_test"].shape[1:]:
        raise ValueError(f"{path}: train and test images differ in size: "
                         f"{d['x_train'].shape[1:]} vs {d['x_test'].shape[1:]}")
    classes = [str(c) for c in _npz_member(f, path, "classes")] if "classes" in f.files else None
    k = len(classes) if classes is not None else int(d["y_train"].max()) + 1
    for split in ("train", "test"):
        y = d[f"y_{split}"]
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"{path}: y_{split} must lie in [0, {k}), found {y.min()}..{y.max()}")
    if len(np.unique(d["y_train"])) < 2:
        raise ValueError(f"{path}: y_train holds a single class; classification needs at least 2 "
                         f"(a 1-class run would report a meaningless 100 %)")
    d["y_train"], d["y_test"] = d["y_train"].astype(np.int64), d["y_test"].astype(np.int64)
    d["classes"] = classes or [str(i) for i in range(k)]
    d["num_classes"] = k
    return d


def split_labeled(y: np.ndarray, n_per_class: int, seed: int, num_classes: int | None = None
                  ) -> np.ndarray:
    """Indices of the labeled set: for each class k = 0..K-1 in turn, a shuffle of its indices by
    one numpy Generator seeded with `seed`, of which the first n_per_class are taken.
    The unlabeled set is the whole training set (labels dropped), as in FixMatch and [G]."""
    y = np.asarray(y)
    k = num_classes if num_classes is not None else int(y.max()) + 1
    if n_per_class < 1:
        raise ValueError(f"labels per class must be >= 1, got {n_per_class}")
    return per_class_first(y, n_per_class, np.random.default_rng(seed), k,
                           "training images", "labels per class asked for")


def split_indices(y: np.ndarray, k: int, args) -> tuple[np.ndarray, np.ndarray]:
    """(labeled, unlabeled) training indices for train.py's flags: the seeded per-class split with
    the whole training set unlabeled (FixMatch, [G]), the indices of --labeled-idx
    (docs/active_learning.md), or the long-tailed split with disjoint sets (docs/long_tailed.md)."""
    if args.labeled_idx:
        if sha256_of(args.labeled_idx) != args.labeled_idx_sha256:
            raise ValueError(f"--labeled-idx {args.labeled_idx} changed while the run started; "
                             f"run the command again")
        idx = read_index_file(args.labeled_idx)
        check_index_range(idx, len(y), args.labeled_idx)
        return idx, np.arange(len(y))
    if args.lt_labeled:
        return split_long_tailed(y, args.lt_labeled, args.lt_unlabeled, args.imb_ratio_l,
                                 args.imb_ratio_u, args.seed, k)
    return split_labeled(y, args.labels_per_class, args.seed, k), np.arange(len(y))


def sha256_of(path: str) -> str:
    """Hex sha256 of a file (a labeled set, a checkpoint), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_index_file(path: str) -> np.ndarray:
    """A labeled set written by query.py or by hand: training-set indices, one per line in a text
    file (blank lines and # comments ignored) or a 1-D integer .npy. Returned sorted, int64.
    Not empty, no duplicates, no negatives; the upper bound is checked against the dataset by
    check_index_range. Every problem is a ValueError naming the file and the fix."""
    if os.path.isdir(path):
        raise ValueError(f"labeled index file {path!r} is a directory; give the .txt or .npy file")
    if not os.path.isfile(path):
        raise ValueError(f"labeled index file {path!r} does not exist")
    if path.endswith(".npy"):
        try:
            a = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any unreadable .npy is the same error to the user
            raise ValueError(f"{path}: not a readable .npy array ({type(e).__name__})") from None
        if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise ValueError(f"{path}: expected a 1-D integer array of training indices, got "
                             f"shape {a.shape} dtype {a.dtype}")
        if a.size and np.issubdtype(a.dtype, np.unsignedinteger) and a.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{path}: index {a.max()} is far out of range")
    else:
        vals = []
        with open(path, errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                line = line.split("#")[0].strip()
                if not line:
                    continue
                # plain ASCII digits only: int() would also take "1_0", "+2" or other scripts' digits
                if not re.fullmatch(r"-?[0-9]+", line):
                    raise ValueError(f"{path}, line {n}: {line[:40]!r} is not an integer index; "
                                     f"the file holds one training-set index per line")
                if len(line) > 18:
                    raise ValueError(f"{path}, line {n}: index {line[:40]} is far out of range")
                vals.append(int(line))
        a = np.array(vals, dtype=np.int64)
    if a.size == 0:
        raise ValueError(f"{path}: no indices; the labeled set needs at least one image")
    a = a.astype(np.int64)
    if a.min() < 0:
        raise ValueError(f"{path}: negative index {a.min()}; indices count from 0")
    uniq, counts = np.unique(a, return_counts=True)
    if len(uniq) < len(a):
        raise ValueError(f"{path}: index {uniq[counts > 1][0]} appears {counts.max()} times; "
                         f"each image can be labeled once")
    return uniq


def check_index_range(idx: np.ndarray, n_train: int, path: str) -> None:
    if idx.max() >= n_train:
        raise ValueError(f"{path}: index {idx.max()} is out of range: the training set has "
                         f"{n_train} images (0..{n_train - 1}); was the file made for another "
                         f"dataset?")


def lt_counts(n1: int, gamma: float, num_classes: int) -> list[int]:
    """Long-tailed class counts (docs/long_tailed.md):
    N_k = floor(N_1 gamma^(-(k-1)/(K-1))), k = 1..K, class 1 (index 0) the head, the last class
    exactly floor(N_1 / gamma). gamma = 1 is uniform; a negative gamma gives the list of |gamma|
    reversed (head classes rare)."""
    if num_classes < 2:
        raise ValueError(f"a long-tailed split needs at least 2 classes, got {num_classes}")
    if n1 < 1 or abs(gamma) < 1:
        raise ValueError(f"long-tailed counts need N_1 >= 1 and |gamma| >= 1, got {n1} and {gamma}")
    g = abs(gamma)
    # the small epsilon keeps float error (e.g. 14.999999) from dropping a whole image
    counts = [math.floor(n1 * g ** (-k / (num_classes - 1)) + 1e-9) for k in range(num_classes)]
    counts[-1] = math.floor(n1 / g + 1e-9)
    return counts[::-1] if gamma < 0 else counts


def split_long_tailed(y: np.ndarray, n1: int, m1: int, gamma_l: float, gamma_u: float, seed: int,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labeled and unlabeled indices of the long-tailed protocol (docs/long_tailed.md; USB's CISSL):
    per class a seeded shuffle, the first N_k labeled, the next M_k unlabeled (disjoint)."""
    n_l, n_u = lt_counts(n1, gamma_l, num_classes), lt_counts(m1, gamma_u, num_classes)
    rng = np.random.default_rng(seed)
    lb, ulb = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(np.asarray(y) == c)
        if len(idx) < n_l[c] + n_u[c]:
            raise ValueError(f"class {c} has {len(idx)} training images, fewer than the "
                             f"{n_l[c]} labeled + {n_u[c]} unlabeled that the long-tailed split "
                             f"asks for; lower --lt-labeled / --lt-unlabeled")
        rng.shuffle(idx)
        lb.append(idx[:n_l[c]])
        ulb.append(idx[n_l[c]:n_l[c] + n_u[c]])
    return np.concatenate(lb).astype(np.int64), np.concatenate(ulb).astype(np.int64)


def per_class_first(y: np.ndarray, n: int, rng: np.random.Generator, num_classes: int,
                    what: str = "images", asked: str = "asked for") -> np.ndarray:
    """For each class k = 0..K-1 in turn: shuffle its indices with rng, keep the first n."""
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < n:
            raise ValueError(f"class {c} has {len(idx)} {what}, fewer than the {n} {asked}")
        rng.shuffle(idx)
        out.append(idx[:n])
    return np.concatenate(out).astype(np.int64)


def channel_stats(x_train: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images, in [0, 1] units."""
    x = x_train.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(0).tolist(), x.std(0).tolist()


def to_tensor_images(x: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """(N, H, W, 3) uint8 numpy -> (N, 3, H, W) uint8 tensor on `device` (the data stays uint8)."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)


class IndexSampler:
    """Index batches from one set: a stream of seeded random permutations (one per pass over the
    set), cut into batches. A batch larger than the set spans several permutations, as
    FixMatch's replacement-free repetition of the few labeled images does. No host sync."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        if n < 1 or batch_size < 1:
            raise ValueError(f"IndexSampler needs n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.batch_size, self.g = n, batch_size, generator
        self.buf = torch.empty(0, dtype=torch.long, device=generator.device)
        self.pos = 0

    def next(self) -> torch.Tensor:
        while self.buf.numel() - self.pos < self.batch_size:
            perm = torch.randperm(self.n, generator=self.g, device=self.g.device)
            self.buf, self.pos = torch.cat([self.buf[self.pos:], perm]), 0
        out = self.buf[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return out

    def state_dict(self) -> dict:
        return {"buf": self.buf[self.pos:].cpu(), "rng": self.g.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.buf, self.pos = s["buf"].to(self.g.device), 0
        self.g.set_state(s["rng"])


# ---------------------------------------------------------------- augmentation ops

OPS = ["AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
       "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY"]
RANGES = {"AutoContrast": (0, 1), "Brightness": (0.05, 0.95), "Color": (0.05, 0.95),
          "Contrast": (0.05, 0.95), "Equalize": (0, 1), "Identity": (0, 1), "Posterize": (4, 8),
          "Rotate": (-30, 30), "Sharpness": (0.05, 0.95), "ShearX": (-0.3, 0.3),
          "ShearY": (-0.3, 0.3), "Solarize": (0, 256), "TranslateX": (-0.3, 0.3),
          "TranslateY": (-0.3, 0.3)}
OP = {name: i for i, name in enumerate(OPS)}
AFFINE = [OP[o] for o in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")]
ENHANCE = [OP[o] for o in ("Brightness", "Color", "Contrast", "Sharpness")]
LOOKUP = [OP[o] for o in ("AutoContrast", "Equalize", "Posterize", "Solarize")]
CUTOUT_FILL = (125.0, 123.0, 114.0)
LOW = tuple(float(RANGES[o][0]) for o in OPS)
HIGH = tuple(float(RANGES[o][1]) for o in OPS)


@functools.lru_cache(maxsize=None)
def _const(values: tuple, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small constant tensor, copied to the device once: a host-to-device copy of pageable
    memory inside the step would wait for the GPU queue (a hidden sync)."""
    return torch.tensor(values, device=device, dtype=dtype)


def _pil_round15(t: torch.Tensor) -> torch.Tensor:
    """PIL's Image.rotate rounds cos and sin to 15 decimals (Python's round(v, 15))."""
    return torch.round(t * 1e15) / 1e15


def _affine_coefficients(op: torch.Tensor, v: torch.Tensor, h: int, w: int, present) -> list:
    """Per image (a, b, c, d, e, f) of the map (x, y) -> (a x + b y + c, d x + e y + f) that PIL
    builds, in double precision as PIL's Python floats: the magnitude, Rotate's cos / sin
    rounded to 15 decimals, about the centre (w/2, h/2). Identity for images with another op."""
    v = v.double()  # the magnitude as PIL receives it: a Python float
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    a, b, c, d, e, f = one, zero, zero, zero, one, zero
    if OP["ShearX"] in present:
        b = torch.where(op == OP["ShearX"], v, b)
    if OP["ShearY"] in present:
        d = torch.where(op == OP["ShearY"], v, d)
    if OP["TranslateX"] in present:
        c = torch.where(op == OP["TranslateX"], v * w, c)
    if OP["TranslateY"] in present:
        f = torch.where(op == OP["TranslateY"], v * h, f)
    if OP["Rotate"] in present:
        rot = op == OP["Rotate"]
        theta = -torch.deg2rad(torch.remainder(v, 360.0))  # PIL: angle % 360, then -radians
        cos, sin = _pil_round15(torch.cos(theta)), _pil_round15(torch.sin(theta))
        cx, cy = w / 2.0, h / 2.0  # the matrix maps (-cx, -cy), then adds the centre back
        a, b = torch.where(rot, cos, a), torch.where(rot, sin, b)
        d, e = torch.where(rot, -sin, d), torch.where(rot, cos, e)
        c = torch.where(rot, (cos * -cx + sin * -cy) + cx, c)
        f = torch.where(rot, (-sin * -cx + cos * -cy) + cy, f)
    return [t.view(-1, 1, 1) for t in (a, b, c, d, e, f)]


def _affine(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor, present=AFFINE) -> torch.Tensor:
    """Rotate / ShearX / ShearY / TranslateX / TranslateY exactly as PIL's Image.transform(AFFINE)
    and Image.rotate do with NEAREST. Output pixel (x, y) reads input (a x' + b y' + c,
    d x' + e y' + f) at the pixel centre (x', y') = (x + .5, y + .5), with PIL's arithmetic:
    a map with b = d = 0 (translations) by PIL's scaling path, floor of the double coordinate
    floor(c + a/2 + a x) (a function of x alone) and floor(f + e/2 + e y) (of y alone); any
    other (rotations, shears) by PIL's 16.16 fixed-point path: each coefficient rounded to an
    integer number of 1/65536, the coordinate (A2 + A1 y + A0 x) >> 16 in integers. Black outside.

    Float64 is used only where PIL uses doubles: the n x 6 coefficients and the scaling path's
    h + w coordinates per image. The h x w per-pixel work is int32: one row term (n, h, 1) plus
    one column term (n, 1, w), a shift, a clamp into a 1-pixel black border, one gather."""
    n, ch, h, w = x.shape
    p = _affine_coefficients(op, v, h, w, present)
    dev = x.device
    ys = torch.arange(h, device=dev, dtype=torch.float64).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=torch.float64).view(1, 1, w)
    # the scaling path, separable; + 1 for the black border, and anything outside lands on it
    sx = torch.floor((p[2] + p[0] * 0.5) + xs * p[0]).clamp_(-1, w) + 1
    sy = torch.floor((p[5] + p[4] * 0.5) + ys * p[4]).clamp_(-1, h) + 1
    if OP["Rotate"] in present or OP["ShearX"] in present or OP["ShearY"] in present:
        # the fixed-point path: FIX(t) = floor(t * 65536 + 0.5), integers exact in double;
        # images on the scaling path get row term sy << 16 (y) and column term sx << 16 (x)
        fix = [torch.floor(t * 65536.0 + 0.5) for t in
               (p[0], p[1], p[2] + p[0] * 0.5 + p[1] * 0.5, p[3], p[4],
                p[5] + p[3] * 0.5 + p[4] * 0.5)]
        fixed = (p[1] != 0) | (p[3] != 0)
        x_row = torch.where(fixed, (fix[2] + 65536.0) + ys * fix[1], 0.0).to(torch.int32)
        x_col = torch.where(fixed, xs * fix[0], sx * 65536.0).to(torch.int32)
        y_row = torch.where(fixed, (fix[5] + 65536.0) + ys * fix[4], sy * 65536.0).to(torch.int32)
        y_col = torch.where(fixed, xs * fix[3], 0.0).to(torch.int32)
        ix = ((x_row + x_col) >> 16).clamp_(0, w + 1)
        iy = ((y_row + y_col) >> 16).clamp_(0, h + 1)
        idx = (iy * (w + 2)).add_(ix)
    else:
        idx = (sy * (w + 2)).to(torch.int32) + sx.to(torch.int32)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1)).view(n, ch, (h + 2) * (w + 2))
    idx = idx.long().view(n, 1, h * w).expand(n, ch, h * w)
    return padded.gather(2, idx).view(n, ch, h, w)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16 (exact in float32)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((19595.0 * r + 38470.0 * g + 7471.0 * b + 32768.0) / 65536.0)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageFilter.SMOOTH: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, rounded; border pixels kept.
    Written as a 3x3 box sum plus 4x the centre: on CPU this is ~10x faster than a depthwise conv."""
    rows = (x[:, :, :-2] + x[:, :, 1:-1]).add_(x[:, :, 2:])
    box = (rows[:, :, :, :-2] + rows[:, :, :, 1:-1]).add_(rows[:, :, :, 2:])
    # s = box + 4 centre is an integer (exact in float32), and (s + 6.5) / 13 lies at least
    # 0.5 / 13 from any integer, so every float32 rounding of it has the floor of s / 13 + 0.5
    s = box.add_(x[:, :, 1:-1, 1:-1], alpha=4.0)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = s.add_(6.5).mul_(1.0 / 13.0).floor_()
    return out


def _enhance(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor, present=ENHANCE) -> torch.Tensor:
    """PIL ImageEnhance: Image.blend(degenerate, img, v) = trunc(deg + v (img - deg)), clipped.
    Degenerate: black (Brightness), grayscale (Color), mean gray level (Contrast), SMOOTH-filtered
    (Sharpness). Images with another op get factor 1, which returns them unchanged exactly.
    `present` lists the ops that may occur, so that the CPU path computes no unused degenerate."""
    o = op.view(-1, 1, 1, 1)
    x = x.float()
    degs = {OP["Brightness"]: torch.zeros_like(x[:, :1, :1, :1])}
    if OP["Color"] in present or OP["Contrast"] in present:
        gray = _grayscale(x)
        degs[OP["Color"]] = gray
        degs[OP["Contrast"]] = torch.floor(gray.mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    if OP["Sharpness"] in present:
        degs[OP["Sharpness"]] = _smooth(x)
    if len(present) == 1:
        deg = degs[present[0]]
    else:  # per-image choice as a sum of 0/1-masked terms: exact, and far cheaper than where on CPU
        deg = sum(d * (o == k) for k, d in degs.items() if k in present)
    factor = torch.where(torch.isin(op, _const(tuple(ENHANCE), op.device)), v, 1.0)
    # truncation toward zero of a non-negative float, as PIL's (UINT8) cast
    # (x - deg) v + deg is deg + v (x - deg) bit for bit (IEEE + and * commute), in place
    return (x - deg).mul_(factor.view(-1, 1, 1, 1)).add_(deg).clamp_(0, 255).to(torch.uint8)


def _lookup(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor, present=LOOKUP) -> torch.Tensor:
    """PIL ImageOps: Solarize, Posterize as pixel maps; AutoContrast, Equalize as per-image,
    per-channel 256-entry tables, built in float64 because PIL builds them in Python floats.
    Images with another op are returned unchanged."""
    n, c, h, w = x.shape
    o = op.view(n, 1, 1, 1)
    vv = v.view(n, 1, 1, 1)
    if OP["Solarize"] in present:  # invert the values >= threshold v, i.e. >= ceil(v) (integers)
        flip = x >= torch.ceil(vv).clamp(0, 256).to(torch.int16)  # integer compare, no float
        if len(present) > 1:
            flip &= o == OP["Solarize"]
        x = x ^ (flip.to(torch.uint8) * 255)  # 255 - x = x xor 255 for uint8
    if OP["Posterize"] in present:  # keep the top int(v) bits: x & (256 - 2^(8 - bits))
        mask = torch.where(o == OP["Posterize"], 256.0 - torch.exp2(8 - torch.floor(vv)), 255.0)
        x = x & mask.to(torch.uint8)
    if OP["AutoContrast"] not in present and OP["Equalize"] not in present:
        return x
    xl = x.long().view(n, c, h * w)
    i = torch.arange(256, device=x.device, dtype=torch.float64).expand(n, c, 256)
    o = op.view(n, 1, 1)
    lut = i
    hi_x = x.amax(dim=(2, 3))
    if OP["AutoContrast"] in present:  # stretch [min, max] of each channel to [0, 255]
        lo = x.amin(dim=(2, 3)).double().unsqueeze(2)
        hi = hi_x.double().unsqueeze(2)
        # a true division as in PIL: `255.0 / tensor` would multiply by a rounded reciprocal
        scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)
        stretched = torch.floor(i * scale - lo * scale).clamp(0, 255)
        lut = torch.where((o == OP["AutoContrast"]) & (hi > lo), stretched, lut)
    if OP["Equalize"] in present:  # PIL: step = (count - count of the last nonzero bin) // 255,
        # lut[i] = (step // 2 + #pixels < i) // step, in Python integers. The histogram is
        # counted in int64 (per pixel: no float64 atomics on a GPU), the 256-entry table is
        # computed in double, which holds these integers and their floor divisions exactly
        hist = torch.zeros(n, c, 256, device=x.device, dtype=torch.long)
        hist = hist.scatter_add_(2, xl, torch.ones_like(hist[:1, :1, :1]).expand_as(xl)).double()
        last = hist.gather(2, hi_x.long().unsqueeze(2))
        step_eq = torch.floor((h * w - last) / 255.0)
        below = torch.cumsum(hist, 2) - hist
        equalized = torch.floor((torch.floor(step_eq / 2) + below) / step_eq.clamp(min=1))
        lut = torch.where((o == OP["Equalize"]) & (step_eq > 0), equalized.clamp(0, 255), lut)
    return lut.to(torch.uint8).gather(2, xl).view(n, c, h, w)


_FAMILIES = ((AFFINE, _affine), (ENHANCE, _enhance), (LOOKUP, _lookup))
_FAMILY_OF = {k: fn for members, fn in _FAMILIES for k in members}
# the CPU path's slices: the five affine ops together (one per-pixel formula, so one call costs
# what five would in pixels and a fifth in small tensor ops), every other op on its own
_GROUPS = [tuple(AFFINE)] + [(k,) for k in range(len(OPS)) if k not in AFFINE]
_GROUP_OF = tuple(next(j for j, grp in enumerate(_GROUPS) if k in grp) for k in range(len(OPS)))


def apply_ops(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor, subset: bool | None = None,
              inplace: bool = False) -> torch.Tensor:
    """Apply op[i] with magnitude v[i] to image i of x (uint8, N, 3, H, W).
    subset=True runs each op on its own images only (it needs a host sync: the CPU default);
    False runs each family on the whole batch with identity parameters for the images that drew
    another op (no sync: the CUDA default). inplace=True lets the subset path write into x."""
    if x.dtype != torch.uint8:
        raise ValueError(f"augmentation works on uint8 images, got {x.dtype}")
    subset = x.device.type == "cpu" if subset is None else subset
    if not subset:
        for members, fn in _FAMILIES:
            sel = torch.isin(op, _const(tuple(members), op.device))
            x = fn(x, torch.where(sel, op, OP["Identity"]), v)
        return x
    # sort the images by group once, so that each group works on a contiguous slice (a view)
    order = torch.argsort(_const(_GROUP_OF, op.device)[op], stable=True)
    counts = torch.bincount(op, minlength=len(OPS)).tolist()
    xs, op_s, v_s = x.index_select(0, order), op[order], v[order]
    start = 0
    for grp in _GROUPS:
        present = tuple(k for k in grp if counts[k])
        end = start + sum(counts[k] for k in grp)
        if present and present != (OP["Identity"],):
            xs[start:end] = _FAMILY_OF[grp[0]](xs[start:end], op_s[start:end], v_s[start:end],
                                              present)
        start = end
    out = x if inplace else torch.empty_like(x)
    # back to the input order by the inverse permutation: on CPU index_select is several
    # times faster than index_copy_ (a per-row loop) and gives the same tensor
    return torch.index_select(xs, 0, torch.argsort(order), out=out)


def flip_translate(x: torch.Tensor, flip: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor
                   ) -> torch.Tensor:
    """Per image: horizontal flip where flip[i], then out[y, x] = in[y + dy[i], x + dx[i]] with
    reflect padding (numpy/torch 'reflect': index -1 reads 1). One gather; dtype kept."""
    n, c, h, w = x.shape
    dev = x.device

    def reflect(i, size):
        i = i.abs()
        return torch.where(i > size - 1, 2 * (size - 1) - i, i)

    iy = reflect(torch.arange(h, device=dev).view(1, h, 1) + dy.view(n, 1, 1), h)
    ix = reflect(torch.arange(w, device=dev).view(1, 1, w) + dx.view(n, 1, 1), w)
    ix = torch.where(flip.view(n, 1, 1), w - 1 - ix, ix)
    idx = (iy * w + ix).view(n, 1, h * w).expand(n, c, h * w)  # rows x cols: one broadcast add
    return x.reshape(n, c, h * w).gather(2, idx).view(n, c, h, w)


def weak(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """alpha: random horizontal flip, then a random translation of -pad..pad px in x and y with
    reflect padding (torchvision RandomHorizontalFlip + RandomCrop(padding=pad, 'reflect')).
    uint8 (N, 3, H, W) in and out."""
    n, dev = x.shape[0], x.device
    flip = torch.rand(n, generator=g, device=dev) < 0.5
    dy = torch.randint(-pad, pad + 1, (n,), generator=g, device=dev)
    dx = torch.randint(-pad, pad + 1, (n,), generator=g, device=dev)
    return flip_translate(x, flip, dy, dx)


def rand_augment(x: torch.Tensor, g: torch.Generator, n_ops: int = 3) -> torch.Tensor:
    """USB RandAugment: n_ops ops drawn with replacement per image, magnitude U(lo, hi) each."""
    return _rand_augment_(x.clone(), g, n_ops)


def _rand_augment_(x: torch.Tensor, g: torch.Generator, n_ops: int = 3) -> torch.Tensor:
    """rand_augment that may overwrite x (a uint8 tensor the caller owns)."""
    n, dev = x.shape[0], x.device
    ops = torch.randint(0, len(OPS), (n_ops, n), generator=g, device=dev)
    u = torch.rand(n_ops, n, generator=g, device=dev)
    lo, hi = _const(LOW, dev, torch.float32)[ops], _const(HIGH, dev, torch.float32)[ops]
    for j in range(n_ops):
        x = apply_ops(x, ops[j], lo[j] + (hi[j] - lo[j]) * u[j], inplace=True)
    return x


def cutout(x: torch.Tensor, g: torch.Generator, max_frac: float = 0.5) -> torch.Tensor:
    """Cutout as in USB: side s = U(0, max_frac) * W, centre uniform in the image,
    x0 = int(max(0, cx - s/2)), x1 = int(min(W, x0 + s)) (same for y), grey fill."""
    n, _, h, w = x.shape
    dev = x.device
    side = torch.rand(n, generator=g, device=dev) * max_frac * w
    cx = torch.rand(n, generator=g, device=dev) * w
    cy = torch.rand(n, generator=g, device=dev) * h
    x0 = torch.floor((cx - side / 2).clamp(min=0))
    y0 = torch.floor((cy - side / 2).clamp(min=0))
    x1 = torch.floor((x0 + side).clamp(max=w))
    y1 = torch.floor((y0 + side).clamp(max=h))
    return fill_box(x, y0, x0, y1, x1)


def fill_box(x: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, y1: torch.Tensor,
             x1: torch.Tensor) -> torch.Tensor:
    """Fill pixels y0 <= y < y1, x0 <= x < x1 of each image with the grey (125, 123, 114)."""
    n, _, h, w = x.shape
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    in_x = (xs >= x0.view(n, 1, 1)) & (xs < x1.view(n, 1, 1))  # (n, 1, w): separable, cheap
    in_y = (ys >= y0.view(n, 1, 1)) & (ys < y1.view(n, 1, 1))  # (n, h, 1)
    box = (in_y & in_x).unsqueeze(1)
    fill = _const(CUTOUT_FILL, x.device, x.dtype).view(1, 3, 1, 1)
    return x * ~box + fill * box  # exact (0/1 masks), and much cheaper than where on CPU


def strong(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A: weak, RandAugment(3 ops), Cutout. uint8 (N, 3, H, W) in and out."""
    return cutout(_rand_augment_(weak(x, g), g), g)


class Normalize:
    """(x / 255 - mean) / std per channel, optionally to channels_last (for the conv net)."""

    def __init__(self, mean: list[float], std: list[float], device, channels_last: bool = False):
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, 3, 1, 1)
        self.shift = (torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, 3, 1, 1)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float() * self.scale - self.shift
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out


# ---------------------------------------------------------------- a CPU-scale subset (CLI)

def make_subset(ds: dict, per_class_train: int, per_class_test: int, seed: int) -> dict:
    """A class-balanced subset in the npz: format: for each class, a seeded shuffle of its train
    (test) indices, the first per_class_train (per_class_test) kept, in class order."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        y = ds[f"y_{split}"]
        idx = per_class_first(y, n, rng, ds["num_classes"], f"{split} images")
        out[f"x_{split}"], out[f"y_{split}"] = ds[f"x_{split}"][idx], y[idx]
    out["classes"] = np.array(ds["classes"], dtype=str)
    return out


def save_npz(path: str, arrays: dict) -> None:
    """np.savez, written atomically (a temporary file, then a rename)."""
    import checkpoint
    checkpoint.atomic_write(path, lambda fh: np.savez(fh, **arrays))


def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="Build a class-balanced subset of CIFAR (or of an npz: "
                                "dataset) in the project's npz: format, e.g. the CPU-scale set: "
                                "python data.py make-subset --out cifar10-5k.npz")
    p.add_argument("command", choices=["make-subset"])
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 or npz:PATH")
    p.add_argument("--data-dir", default="data", help="where CIFAR is (or is downloaded to)")
    p.add_argument("--per-class-train", type=int, default=500, help="training images per class")
    p.add_argument("--per-class-test", type=int, default=100, help="test images per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class choice")
    p.add_argument("--out", required=True, help="the .npz file to write")
    a = p.parse_args(argv)
    if a.per_class_train < 1 or a.per_class_test < 1:
        p.error("--per-class-train and --per-class-test must be >= 1")
    if not a.out.endswith(".npz"):
        p.error(f"--out must end in .npz, got {a.out}")
    try:
        sub = make_subset(load_dataset(a.dataset, a.data_dir), a.per_class_train,
                          a.per_class_test, a.seed)
        save_npz(a.out, sub)
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"data.py: error: {e}") from None
    print(f"wrote {a.out}: {len(sub['x_train'])} train + {len(sub['x_test'])} test images, "
          f"{len(sub['classes'])} classes")


if __name__ == "__main__":
    main()
