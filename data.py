"""Datasets, the labeled/unlabeled split, index sampling and batched on-device augmentation.

The training images live on the training device (or, with --data-device cpu, in pinned host
memory) as uint8 (N, C, H, W), C = 3 or 1 (grayscale; docs/own_data.md). A step draws index
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
import sys

import numpy as np
import torch

# ---------------------------------------------------------------- datasets

CIFAR_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


BUILTIN = ("cifar10", "cifar100", "stl10", "svhn", "mnist", "fashionmnist", "usps")
DIGITS = ("svhn", "mnist", "usps")  # no horizontal flip by default: a flipped digit is another glyph
DATASET_HELP = ("cifar10, cifar100, stl10, svhn, mnist, fashionmnist, usps, npz:PATH or "
                "folder:PATH")


def is_dataset_name(name: str) -> bool:
    return name in BUILTIN or name.startswith(("npz:", "folder:"))


def load_dataset(name: str, data_dir: str = "data", image_size: int | None = None) -> dict:
    """`cifar10`, `cifar100`, `stl10`, `svhn`, `mnist`, `fashionmnist`, `usps` (torchvision,
    downloaded into data_dir), `npz:PATH` or `folder:PATH` (an image folder, docs/own_data.md).

    Returns a dict with numpy arrays x_train (N, H, W, C) uint8 with C = 3 or 1, y_train (N,)
    int64, x_test, y_test, optionally x_unlabeled (M, H, W, C) (images without labels), and
    `classes` (list of names) and `num_classes`.
    """
    if name.startswith("npz:"):  # "~" is not expanded by the shell after "npz:" or "folder:"
        d = load_npz(os.path.expanduser(name[4:]))
    elif name.startswith("folder:"):
        d = load_folder(os.path.expanduser(name[7:]), image_size)
    elif name in CIFAR_URLS:
        d = load_cifar(name, data_dir)
    elif name == "stl10":
        d = load_stl10(data_dir)
    elif name == "svhn":
        d = load_svhn(data_dir)
    elif name in MNIST_FAMILY:
        d = load_mnist_family(name, data_dir)
    else:
        raise ValueError(f"unknown dataset {name!r}: use {DATASET_HELP}")
    for key in ("x_train", "x_test", "x_unlabeled"):
        if key in d and d[key].ndim == 3:  # single-channel (N, H, W): give it its channel axis
            d[key] = d[key][..., None]
    return d


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


def check_images(x: np.ndarray, what: str) -> np.ndarray:
    """Images as uint8 (N, H, W, C) with C = 3 (colour) or 1 (grayscale; (N, H, W) is accepted
    and given its channel axis). Anything else is a ValueError naming `what`."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must have shape (N, H, W, 3) (colour) or (N, H, W) / "
                         f"(N, H, W, 1) (grayscale), got {x.shape}")
    if x.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 in 0..255, got {x.dtype}")
    if len(x) == 0:
        raise ValueError(f"{what} is empty")
    if min(x.shape[1:3]) < MIN_SIZE:
        raise ValueError(f"{what}: images are {x.shape[1]} x {x.shape[2]}; the augmentation "
                         f"needs at least {MIN_SIZE} x {MIN_SIZE} pixels")
    return x


def _shape_words(x: np.ndarray) -> str:
    return f"{x.shape[1]} x {x.shape[2]} with {x.shape[3]} channel{'s' * (x.shape[3] != 1)}"


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


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "classes", "x_unlabeled")


def check_npz_keys(path: str, keys: list[str]) -> None:
    """An array name very close to a known name the archive lacks (x_unlabelled, y_tests,
    X_train) is a typo that would silently drop data: an error. Any other unknown name is
    reported as unused and ignored (the cutoff keeps x_labeled from reading as x_unlabeled)."""
    import difflib
    absent = [k for k in NPZ_KEYS if k not in keys]
    for key in keys:
        if key in NPZ_KEYS:
            continue
        close = [k for k in absent if k == key.lower()] or difflib.get_close_matches(
            key, absent, 1, 0.91)
        if close:
            raise ValueError(f"{path}: array {key!r} is not a known name; did you mean "
                             f"{close[0]!r}? (known: {', '.join(NPZ_KEYS)})")
        print(f"warning: {path}: array {key!r} is not used (known: {', '.join(NPZ_KEYS)})",
              file=sys.stderr)


def load_npz(path: str) -> dict:
    """A dataset as arrays x_train (N,H,W,3) uint8, y_train (N,) int in [0,K), x_test, y_test,
    optional classes. Every inconsistency is a ValueError that says what to fix."""
    if os.path.isdir(path):
        raise ValueError(f"npz dataset {path!r} is a directory; {NPZ_HELP}")
    if not os.path.isfile(path):
        raise ValueError(f"npz dataset {path!r} does not exist")
    try:
        f = np.load(path, allow_pickle=False)
    except OSError as e:
        if not os.access(path, os.R_OK):
            raise ValueError(f"npz dataset {path!r} cannot be read ({type(e).__name__}); check "
                             f"its permissions") from None
        raise ValueError(f"{path!r} is not an .npz archive; {NPZ_HELP}") from None
    except Exception:  # noqa: BLE001 - numpy's own message here is misleading ("pickled data")
        raise ValueError(f"{path!r} is not an .npz archive; {NPZ_HELP}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} is a single .npy array, not an .npz archive; {NPZ_HELP}")
    check_npz_keys(path, f.files)
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing} (it has {f.files}); expected x_train, "
                         f"y_train, x_test, y_test (and optional classes, x_unlabeled)")
    d = {k: _npz_member(f, path, k) for k in ("x_train", "y_train", "x_test", "y_test")}
    for split in ("train", "test"):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        d[f"x_{split}"] = x = check_images(x, f"{path}: x_{split}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"{path}: y_{split} must have shape ({len(x)},), got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: y_{split} must be integers, got {y.dtype}")
    if "x_unlabeled" in f.files:  # images without labels: they join the unlabeled set only
        d["x_unlabeled"] = check_images(_npz_member(f, path, "x_unlabeled"), f"{path}: x_unlabeled")
        if d["x_unlabeled"].shape[1:] != d["x_train"].shape[1:]:
            raise ValueError(f"{path}: x_unlabeled images are {_shape_words(d['x_unlabeled'])} but "
                             f"x_train images are {_shape_words(d['x_train'])}; they must match")
    if d["x_train"].shape[1:] != d["x_test"].shape[1:]:
        raise ValueError(f"{path}: x_test images are {_shape_words(d['x_test'])} but x_train "
                         f"images are {_shape_words(d['x_train'])}; they must match")
    classes = [str(c) for c in _npz_member(f, path, "classes")] if "classes" in f.files else None
    k = len(classes) if classes is not None else int(d["y_train"].max()) + 1
    for split in ("train", "test"):
        y = d[f"y_{split}"]
        if y.min() < 0:
            raise ValueError(f"{path}: y_{split} holds negative labels (smallest {y.min()}); labels "
                             f"are class indices 0..K-1: put images without a label in "
                             f"x_unlabeled instead")
        if y.max() >= k:
            hint = ("; y_test has a class y_train lacks: pass classes=[...] naming all K classes"
                    if split == "test" and classes is None else "")
            raise ValueError(f"{path}: y_{split} must lie in [0, {k}), found "
                             f"{y.min()}..{y.max()}{hint}")
    if len(np.unique(d["y_train"])) < 2:
        raise ValueError(f"{path}: y_train holds a single class; classification needs at least 2 "
                         f"(a 1-class run would report a meaningless 100 %)")
    d["y_train"], d["y_test"] = d["y_train"].astype(np.int64), d["y_test"].astype(np.int64)
    d["classes"] = classes or [str(i) for i in range(k)]
    d["num_classes"] = k
    return d


# ---------------------------------------------------------------- MNIST family

MNIST_FAMILY = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "usps": "USPS"}  # torchvision class
IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
USPS_FILES = {"train": "usps.bz2", "test": "usps.t.bz2"}
MNIST_SOURCES = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "fashionmnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                 "usps": "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: str) -> np.ndarray:
    """One IDX file (LeCun's format: 2 zero bytes, type 0x08 = uint8, ndim, ndim big-endian int32
    sizes, the data), gzip-compressed when the name ends in .gz."""
    import gzip
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e}); replace the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of uint8 (header {raw[:4].hex()}, expected "
                         f"0000 08 <ndim>); replace the file")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", ndim, 4)) if len(raw) >= 4 + 4 * ndim else None
    if shape is None or len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
        raise ValueError(f"{path}: truncated or padded IDX file ({len(raw)} bytes for shape "
                         f"{shape}); replace the file")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _idx_paths(folder: str) -> dict:
    """The four IDX files in folder (plain or .gz) as {key: path or None}."""
    found = {}
    for key, stem in IDX_FILES.items():
        hits = [os.path.join(folder, stem + ext) for ext in ("", ".gz")]
        found[key] = next((p for p in hits if os.path.isfile(p)), None)
    return found


def _mnist_from_idx(paths: dict, name: str) -> dict:
    d = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{paths['x_' + split]}: images {x.shape} and labels {y.shape} do not "
                             f"match (expected (N, H, W) and (N,)); replace the files")
        if y.max() > 9:
            raise ValueError(f"{paths['y_' + split]}: labels must lie in 0..9, found {y.max()}")
        d[f"y_{split}"] = y.astype(np.int64)
    return d


def _download_mnist_family(name: str, data_dir: str) -> None:
    """torchvision's download into data_dir, with every failure turned into one line."""
    files = (", ".join(USPS_FILES.values()) if name == "usps"
             else ", ".join(s + ".gz" for s in IDX_FILES.values()))
    advice = (f"download {files} from {MNIST_SOURCES[name]} and put them in "
              f"{os.path.abspath(data_dir)}, then run again with --data-dir {data_dir}")
    _download(MNIST_FAMILY[name], data_dir, name, advice,
              splits=[{"train": True}, {"train": False}])


def _load_usps(data_dir: str) -> dict:
    """USPS as LIBSVM's usps.bz2 / usps.t.bz2 (pixels in [-1, 1], labels 1..10), read by torchvision."""
    import torchvision
    if not all(os.path.isfile(os.path.join(data_dir, f)) for f in USPS_FILES.values()):
        _download_mnist_family("usps", data_dir)
    d = {}
    for split in ("train", "test"):
        path = os.path.join(data_dir, USPS_FILES[split])
        try:
            ds = torchvision.datasets.USPS(data_dir, train=split == "train", download=False)
            x, y = np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)
        except Exception as e:  # noqa: BLE001 - bz2 / parse errors
            raise ValueError(f"{path}: not a readable USPS file ({type(e).__name__}: {e}); "
                             f"delete it and run again to download it") from None
        if x.shape[1:] != (16, 16) or len(x) == 0 or y.min() < 0 or y.max() > 9:
            raise ValueError(f"{path}: expected 16 x 16 images with labels 1..10, got images "
                             f"{x.shape} and labels {y.min() + 1}..{y.max() + 1}")
        d[f"x_{split}"], d[f"y_{split}"] = x, y
    return d


def load_mnist_family(name: str, data_dir: str) -> dict:
    """`mnist`, `fashionmnist` (28 x 28) or `usps` (16 x 16) as the standard dataset dict, images
    single-channel (N, H, W) uint8.

    MNIST / Fashion-MNIST: a data_dir holding the four IDX files (train-images-idx3-ubyte ...,
    plain or .gz) is read directly, as is torchvision's layout data_dir/MNIST/raw/; otherwise
    torchvision downloads them into data_dir. USPS: data_dir/usps.bz2 and usps.t.bz2, else the
    download. Missing files offline are one RuntimeError that says what to put where.
    """
    if name not in MNIST_FAMILY:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(MNIST_FAMILY)}")
    if name == "usps":
        d = _load_usps(data_dir)
        classes = [str(i) for i in range(10)]
    else:
        folders = [data_dir, os.path.join(data_dir, MNIST_FAMILY[name], "raw")]
        paths = next((p for p in map(_idx_paths, folders) if all(p.values())), None)
        if paths is None:
            partial = _idx_paths(data_dir)
            if any(partial.values()):  # a half-filled folder is a user mistake, not a download cue
                missing = [IDX_FILES[k] for k, p in partial.items() if p is None]
                raise ValueError(f"{os.path.abspath(data_dir)} holds only some of the {name} IDX "
                                 f"files; missing {', '.join(missing)} (plain or .gz)")
            _download_mnist_family(name, data_dir)
            paths = _idx_paths(folders[1])
        d = _mnist_from_idx(paths, name)
        classes = FASHION_CLASSES if name == "fashionmnist" else [str(i) for i in range(10)]
    d["classes"], d["num_classes"] = list(classes), 10
    return d


# ---------------------------------------------------------------- STL-10, SVHN

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL10_FILES = {"x_train": "train_X.bin", "y_train": "train_y.bin", "x_test": "test_X.bin",
               "y_test": "test_y.bin", "x_unlabeled": "unlabeled_X.bin"}


def _download(cls_name: str, data_dir: str, what: str, advice: str, **kw) -> None:
    """torchvision's download of one dataset into data_dir, every failure as one line."""
    import torchvision
    created = not os.path.exists(data_dir)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a blocked network should fail, not hang
    try:
        for split_kw in kw.get("splits", [{}]):
            getattr(torchvision.datasets, cls_name)(data_dir, download=True, **split_kw)
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"{what} is not in {os.path.abspath(data_dir)} and could not be "
                           f"downloaded ({type(e).__name__}: {reason}); {advice}") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def load_stl10(data_dir: str) -> dict:
    """STL-10: 5,000 labeled training images (500 per class), 8,000 test images and 100,000
    unlabeled images (x_unlabeled), 96 x 96 x 3, read from data_dir/stl10_binary/ (torchvision's
    download; the binary files store each channel column-major). `folds`: the 10 predefined
    labeled folds of fold_indices.txt (--stl10-fold)."""
    folder = os.path.join(data_dir, "stl10_binary")
    advice = (f"download stl10_binary.tar.gz (https://ai.stanford.edu/~acoates/stl10/) and "
              f"extract it into {os.path.abspath(data_dir)} (so that {folder}/train_X.bin "
              f"exists), then run again with --data-dir {data_dir}")
    if not os.path.isdir(folder):
        _download("STL10", data_dir, "stl10", advice, splits=[{"split": "train"}])
    d = {}
    for key, fname in STL10_FILES.items():
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing; {advice}")
        raw = np.fromfile(path, dtype=np.uint8)
        if key.startswith("y_"):
            if raw.size == 0 or raw.min() < 1 or raw.max() > 10:
                raise ValueError(f"{path}: labels must lie in 1..10; replace the file ({advice})")
            d[key] = raw.astype(np.int64) - 1
        else:
            if raw.size == 0 or raw.size % (3 * 96 * 96):
                raise ValueError(f"{path}: {raw.size} bytes is not a whole number of 96 x 96 x 3 "
                                 f"images; replace the file ({advice})")
            d[key] = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)  # (N, C, W, H) -> (N, H, W, C)
    for split in ("train", "test"):
        if len(d[f"x_{split}"]) != len(d[f"y_{split}"]):
            raise ValueError(f"{folder}: {len(d['x_' + split])} {split} images but "
                             f"{len(d['y_' + split])} labels; replace the files ({advice})")
    fold_file = os.path.join(folder, "fold_indices.txt")
    if os.path.isfile(fold_file):
        with open(fold_file) as fh:
            d["folds"] = [np.array(line.split(), dtype=np.int64) for line in fh if line.strip()]
    d["classes"], d["num_classes"] = list(STL10_CLASSES), 10
    return d


def load_svhn(data_dir: str) -> dict:
    """SVHN (cropped digits, 32 x 32 x 3): train_32x32.mat (73,257) and test_32x32.mat (26,032) in
    data_dir, as torchvision downloads them; label 10 is the digit 0. The extra set is not used."""
    files = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
    advice = (f"download {' and '.join(files.values())} from http://ufldl.stanford.edu/housenumbers/ "
              f"into {os.path.abspath(data_dir)}, then run again with --data-dir {data_dir}")
    if not all(os.path.isfile(os.path.join(data_dir, f)) for f in files.values()):
        _download("SVHN", data_dir, "svhn", advice, splits=[{"split": "train"}, {"split": "test"}])
    try:
        import scipy.io
    except ImportError:
        raise RuntimeError("reading SVHN's .mat files needs scipy: pip install scipy") from None
    d = {}
    for split, fname in files.items():
        path = os.path.join(data_dir, fname)
        try:
            m = scipy.io.loadmat(path)
            x, y = np.asarray(m["X"], dtype=np.uint8), np.asarray(m["y"]).reshape(-1)
        except Exception as e:  # noqa: BLE001 - any unreadable .mat is the same error to the user
            raise ValueError(f"{path}: not a readable SVHN file ({type(e).__name__}); delete it "
                             f"and run again to download it, or: {advice}") from None
        d[f"x_{split}"] = np.ascontiguousarray(x.transpose(3, 0, 1, 2))  # (H, W, C, N) -> (N, H, W, C)
        d[f"y_{split}"] = (y.astype(np.int64) % 10)
    d["classes"], d["num_classes"] = [str(i) for i in range(10)], 10
    return d


# ---------------------------------------------------------------- image folders

IMAGE_HELP = "folder:PATH needs PATH/train/<class>/<images> and PATH/test/<class>/<images>"


def _raise(e: OSError) -> None:
    raise e


def _image_files(folder: str) -> list[str]:
    """Every file below folder, any nesting, sorted; hidden files and folders (.DS_Store,
    .ipynb_checkpoints) left out. Linked folders are followed (each real folder once, so a link
    loop ends); a folder that cannot be read is an error, not a silent gap in the data."""
    top = os.path.realpath(folder)
    out, seen = [], {top}
    try:
        for root, dirs, files in os.walk(folder, onerror=_raise, followlinks=True):
            keep = []
            for d in sorted(d for d in dirs if not d.startswith(".")):
                real = os.path.realpath(os.path.join(root, d))
                if real != top and os.path.commonpath([real, top]) == real:
                    raise ValueError(f"{os.path.join(root, d)} links to {real}, which contains "
                                     f"{folder}: its images would be read again under another "
                                     f"label; remove the link")
                if real not in seen:
                    seen.add(real)
                    keep.append(d)
            dirs[:] = keep
            out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
    except OSError as e:
        raise ValueError(f"folder {e.filename} cannot be read ({type(e).__name__}); fix its "
                         f"permissions or remove it") from None
    return out


def _list_classes(top: str, train: bool) -> list[str]:
    """The class folders of PATH/train or PATH/test, sorted. An image lying directly in top (in
    no class folder, by its file name's extension) is an error rather than an image silently
    left out; other files there (README.txt, labels.csv, Thumbs.db) are ignored with a warning."""
    from PIL import Image
    try:
        entries = sorted(e for e in os.listdir(top) if not e.startswith("."))
    except OSError as e:
        raise ValueError(f"folder {top} cannot be read ({type(e).__name__}); fix its "
                         f"permissions") from None
    files = [e for e in entries if not os.path.isdir(os.path.join(top, e))]
    images = [e for e in files if os.path.splitext(e)[1].lower() in Image.registered_extensions()]
    if images:
        more = f" and {len(images) - 2} more" if len(images) > 2 else ""
        where = f"{top}/<class>/" + (" (or, without a label, into unlabeled/)" if train else "")
        raise ValueError(f"{top} holds image(s) outside any class folder: "
                         f"{', '.join(images[:2])}{more}; move each into {where} or delete it")
    if files:
        print(f"warning: {top}: ignoring file(s) outside the class folders: {', '.join(files)}",
              file=sys.stderr)
    return [e for e in entries if e not in files]


def _bad_files(bad: list[str]) -> ValueError:
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return ValueError(f"{len(bad)} file(s) are not readable images: {', '.join(bad[:3])}{more}; "
                      f"remove or replace them")


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # more than 8 bits per pixel
# formats whose EXIF orientation PIL leaves to the caller (it turns TIFFs upright itself)
EXIF_FORMATS = ("JPEG", "MPO", "WEBP")


class _DepthError(ValueError):
    pass


def _orientation(im) -> int:
    """The EXIF orientation tag (1 = upright; 5-8 swap width and height) of a JPEG or WebP; 1
    when there is none or the EXIF block is unreadable (the pixels are still fine)."""
    if im.format not in EXIF_FORMATS:
        return 1
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block raises many kinds
        return 1


def _to_8bit(im, path: str):
    """A 16-bit, 32-bit integer or float grayscale image as mode "L", and its largest integer
    value (None for floats). PIL's convert("L") clips such pixels to 0..255, which turns a
    16-bit image almost white, so they are scaled instead: integers as 16-bit values,
    round(v * 255 / 65535) (16-bit PNG and TIFF open as I;16 or I); floats must lie in [0, 1]
    and become round(v * 255). Anything else is refused."""
    from PIL import Image
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise _DepthError(f"{path}: a float image with values in {a.min():g}..{a.max():g}; "
                              f"floats must lie in [0, 1] (divide 0..255 data by 255), or save "
                              f"it as 8- or 16-bit")
        a, top = np.rint(a * 255), None
    else:
        if a.min() < 0 or a.max() > 65535:
            raise _DepthError(f"{path}: a {im.mode} image with values in {a.min():g}..{a.max():g}"
                              f", outside 16 bits (0..65535): save it as 8- or 16-bit")
        top = int(a.max())
        a = np.rint(a * (255 / 65535))
    return Image.fromarray(a.astype(np.uint8), mode="L"), top


def _decode_images(paths: list[str], image_size: int | None) -> np.ndarray:
    """Decode with PIL once: all grayscale -> (N, H, W, 1), else RGB (N, H, W, 3); resized to
    image_size x image_size (bilinear) if given, else all sizes must agree. A first pass reads
    only the headers (mode, size), so that no decoded image is held twice."""
    from PIL import Image, ImageOps
    heads, bad = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                turned = _orientation(im) in (5, 6, 7, 8)
                heads.append((im.mode, im.size[::-1] if turned else im.size))
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a non-image
            bad.append(f"{p} ({type(e).__name__})")
    if bad:
        raise _bad_files(bad)
    gray = all(mode in GRAY_MODES for mode, _ in heads)
    if image_size is None:
        first = {}
        for p, (_, size) in zip(paths, heads):
            first.setdefault(size, p)
            if len(first) > 1:
                (s0, p0), (s1, p1) = first.items()
                raise ValueError(f"images differ in size: {p0} is {s0[0]} x {s0[1]} but {p1} is "
                                 f"{s1[0]} x {s1[1]}; pass --image-size S to resize all to S x S")
    w, h = (image_size, image_size) if image_size else heads[0][1]
    x = np.empty((len(paths), h, w, 1 if gray else 3), dtype=np.uint8)
    deep_max = []  # the largest value of each integer image of more than 8 bits
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                if _orientation(im) != 1:  # a camera's rotated JPEG: as every viewer shows it
                    im = ImageOps.exif_transpose(im)
                if im.mode in DEEP_MODES:
                    im, top = _to_8bit(im, p)
                    deep_max += [top] if top is not None else []
                im = im.convert("L" if gray else "RGB")  # RGBA, LA: the alpha channel is dropped
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                x[i] = np.asarray(im, dtype=np.uint8).reshape(h, w, -1)
        except _DepthError as e:
            raise ValueError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - e.g. a truncated file fails only when decoded
            bad.append(f"{p} ({type(e).__name__})")
    if bad:
        raise _bad_files(bad)
    if deep_max and max(deep_max) < 4096:  # 8- or 12-bit data saved as 16-bit
        print(f"warning: {len(deep_max)} image(s) of more than 8 bits use values up to only "
              f"{max(deep_max)}; read as 16-bit they come out dark (at most "
              f"{round(max(deep_max) * 255 / 65535)} of 255). If they hold 8- or 12-bit data, "
              f"convert them to 8-bit first", file=sys.stderr)
    return x


def load_folder(path: str, image_size: int | None = None) -> dict:
    """An image folder: PATH/train/<class>/*, PATH/test/<class>/* (labeled; class names = the
    folder names, sorted, index = position) and optional PATH/unlabeled/ (any images, any
    nesting; x_unlabeled). Decoded once with PIL into uint8 arrays; every image of the three
    parts must have one size, or image_size resizes them all. Grayscale only if every image is."""
    if not os.path.isdir(path):
        raise ValueError(f"folder dataset {path!r} is not a directory; {IMAGE_HELP}")
    parts, classes = {}, None
    for split in ("train", "test"):
        top = os.path.join(path, split)
        if not os.path.isdir(top):
            raise ValueError(f"{top} does not exist; {IMAGE_HELP}")
        names = _list_classes(top, split == "train")
        if split == "train":
            classes = names
            if len(classes) < 2:
                raise ValueError(f"{top} holds {len(classes)} class folder(s); classification needs "
                                 f"at least 2 (one folder per class)")
        elif not set(names) <= set(classes):
            extra = sorted(set(names) - set(classes))
            raise ValueError(f"{top} has class folder(s) {extra} that {path}/train does not have")
        files, labels = [], []
        for c, name in enumerate(classes):
            folder = os.path.join(top, name)
            got = _image_files(folder) if os.path.isdir(folder) else []
            if not got and split == "train":
                raise ValueError(f"class folder {folder} is empty; put its labeled images there or "
                                 f"remove the folder")
            files += got
            labels += [c] * len(got)
        if not files:
            raise ValueError(f"{top} holds no images; {IMAGE_HELP}")
        parts[split] = (files, np.array(labels, dtype=np.int64))
    unl = os.path.join(path, "unlabeled")
    if os.path.isdir(unl):
        files = _image_files(unl)
        if not files:
            raise ValueError(f"{unl} holds no images; put the unlabeled images there or remove it")
        parts["unlabeled"] = (files, None)
    order = [k for k in ("train", "test", "unlabeled") if k in parts]
    every = [f for k in order for f in parts[k][0]]
    x = _decode_images(every, image_size)
    if min(x.shape[1:3]) < MIN_SIZE:
        raise ValueError(f"{path}: images are {x.shape[1]} x {x.shape[2]}; the augmentation needs "
                         f"at least {MIN_SIZE} x {MIN_SIZE} pixels (pass --image-size)")
    d, start = {}, 0
    for k in order:
        n = len(parts[k][0])
        d["x_unlabeled" if k == "unlabeled" else f"x_{k}"] = x[start:start + n]
        if parts[k][1] is not None:
            d[f"y_{k}"] = parts[k][1]
        start += n
    d["classes"], d["num_classes"] = list(classes), len(classes)
    return d


def split_labeled(y: np.ndarray, n_per_class: int, seed: int, num_classes: int | None = None,
                  names: list[str] | None = None) -> np.ndarray:
    """Indices of the labeled set: for each class k = 0..K-1 in turn, a shuffle of its indices by
    one numpy Generator seeded with `seed`, of which the first n_per_class are taken.
    The unlabeled set is the whole training set (labels dropped), as in FixMatch and [G]."""
    y = np.asarray(y)
    k = num_classes if num_classes is not None else int(y.max()) + 1
    if n_per_class < 1:
        raise ValueError(f"labels per class must be >= 1, got {n_per_class}")
    return per_class_first(y, n_per_class, np.random.default_rng(seed), k,
                           "training images", "labels per class asked for", names)


def split_indices(y: np.ndarray, k: int, args, names: list[str] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
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
    return split_labeled(y, args.labels_per_class, args.seed, k, names), np.arange(len(y))


def make_splits(ds: dict, args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labeled, unlabeled, validation) indices into the training pool, i.e. x_train followed by
    x_unlabeled (training_pool). The labeled and unlabeled sets are split_indices' (or the
    --stl10-fold, or with --labels-per-class all every training image with a label); the images
    without labels join the unlabeled set. --val-per-class N holds N labeled images per class out
    of both sets, chosen by a seeded shuffle of their own (numpy Generator of (seed, 1)) among the
    images the labeled set does not use, so the labeled set is the one the run without a
    validation split gets."""
    y, k = ds["y_train"], ds["num_classes"]
    n, m = len(y), len(ds.get("x_unlabeled", ()))
    val = np.zeros(0, dtype=np.int64)
    fold = getattr(args, "stl10_fold", None)
    n_val = getattr(args, "val_per_class", 0) or 0
    if fold is not None:
        if "folds" not in ds or fold >= len(ds["folds"]):
            raise ValueError(f"--stl10-fold {fold}: the dataset has {len(ds.get('folds', []))} folds")
        lb, ulb = np.sort(ds["folds"][fold]), np.arange(n)
        check_index_range(lb, n, "fold_indices.txt")
    elif args.labels_per_class == "all":
        lb, ulb = np.arange(n), np.arange(n)
    else:
        lb, ulb = split_indices(y, k, args, ds.get("classes"))
    if n_val:
        rest = np.setdiff1d(np.arange(n), lb) if args.labels_per_class != "all" else lb
        rng = np.random.default_rng((args.seed, 1))
        picked = []
        for c in range(k):
            idx = rest[y[rest] == c]
            if len(idx) < n_val + (args.labels_per_class == "all"):  # "all" keeps >= 1 labeled
                has = (f"{len(idx)} labeled training images and needs at least one of them "
                       f"labeled" if args.labels_per_class == "all" else
                       f"{int((y == c).sum())} training images, {int((y[lb] == c).sum())} of "
                       f"them labeled")
                raise ValueError(f"--val-per-class {n_val} is larger than class "
                                 f"{ds['classes'][c]!r} allows: it has {has}; lower "
                                 f"--val-per-class")
            rng.shuffle(idx)
            picked.append(idx[:n_val])
        val = np.sort(np.concatenate(picked)).astype(np.int64)
        lb, ulb = lb[~np.isin(lb, val)], ulb[~np.isin(ulb, val)]
    return lb, np.concatenate([ulb, np.arange(n, n + m)]).astype(np.int64), val


def fingerprint(ds: dict, splits: tuple[str, ...] = ("train", "test", "unlabeled")) -> dict:
    """The sizes of the train, test and unlabeled sets and a digest (BLAKE2b) of each one's
    images and labels: saved in the checkpoint, so that a run resumed on changed data (an image
    added to test/, a relabeled file) stops instead of mixing evaluations over two datasets, and
    query.py / evaluate.py can tell the run's data from other data of the same shape. Hashed in
    chunks, so that a strided array (STL-10's) is never copied whole."""
    sizes, digest = {}, {}
    for split in splits:
        if f"x_{split}" not in ds:
            continue
        h = hashlib.blake2b(digest_size=16)
        for key in (f"x_{split}", f"y_{split}"):
            if key in ds:
                a = ds[key]
                h.update(f"{key}{a.shape}{a.dtype}".encode())
                for i in range(0, len(a), 1024):
                    h.update(np.ascontiguousarray(a[i:i + 1024]))
        sizes[split], digest[split] = len(ds[f"x_{split}"]), h.hexdigest()
    return {"sizes": sizes, "digest": digest}


def training_pool(ds: dict) -> tuple[np.ndarray, np.ndarray]:
    """x_train followed by x_unlabeled (if any), with the label -1 ("none") for the latter."""
    if "x_unlabeled" not in ds:
        return ds["x_train"], ds["y_train"]
    x = np.concatenate([ds["x_train"], ds["x_unlabeled"]])
    return x, np.concatenate([ds["y_train"], np.full(len(ds["x_unlabeled"]), -1, dtype=np.int64)])


def dataset_stats(ds: dict) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1] units) of the training images: x_train's
    (channel_stats), or, with images without labels, of x_train and x_unlabeled together, from
    exact integer sums in chunks (a float64 copy of 100,000 STL-10 images would need 22 GB)."""
    if "x_unlabeled" not in ds:
        return channel_stats(ds["x_train"])
    c = ds["x_train"].shape[-1]
    total, sq, count = np.zeros(c, dtype=np.int64), np.zeros(c, dtype=np.int64), 0
    for x in (ds["x_train"], ds["x_unlabeled"]):
        for i in range(0, len(x), 1024):
            chunk = x[i:i + 1024].reshape(-1, c).astype(np.int64)
            total += chunk.sum(0)
            sq += (chunk * chunk).sum(0)
            count += len(chunk)
    mean = total / (255.0 * count)
    var = np.maximum(sq / (255.0 ** 2 * count) - mean ** 2, 0.0)
    return mean.tolist(), np.sqrt(var).tolist()


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
        with open(path, encoding="utf-8-sig", errors="replace") as fh:  # a BOM is not an index
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
                    what: str = "images", asked: str = "asked for",
                    names: list[str] | None = None) -> np.ndarray:
    """For each class k = 0..K-1 in turn: shuffle its indices with rng, keep the first n.
    `names` (the class names) only make the error say which class is short."""
    out = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if len(idx) < n:
            hint = (f"; no image has label {c}: labels must count from 0 (1-based labels? "
                    f"subtract 1)" if len(idx) == 0 and c == 0 else "")
            name = f" ({names[c]!r})" if names and names[c] != str(c) else ""
            raise ValueError(f"class {c}{name} has {len(idx)} {what}, fewer than the {n} "
                             f"{asked}{hint}")
        rng.shuffle(idx)
        out.append(idx[:n])
    return np.concatenate(out).astype(np.int64)


def channel_stats(x_train: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images (N, H, W, C), in [0, 1] units."""
    x = x_train.reshape(-1, x_train.shape[-1]).astype(np.float64) / 255.0
    return x.mean(0).tolist(), x.std(0).tolist()


def to_tensor_images(x: np.ndarray, device: torch.device | str, pin: bool = False) -> torch.Tensor:
    """(N, H, W, C) uint8 numpy -> (N, C, H, W) uint8 tensor on `device` (the data stays uint8);
    pin=True puts host memory in page-locked memory (fast, asynchronous copies to a GPU)."""
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    return t.pin_memory() if pin else t


def data_home(data_device: str, dev: torch.device) -> tuple[torch.device, bool]:
    """Where the uint8 images live (--data-device): the training device, or the host ("cpu"),
    pinned when the training device is a GPU so that each batch's copy is asynchronous."""
    if data_device == "cpu":
        return torch.device("cpu"), dev.type == "cuda"
    return dev, False


def gather(x: torch.Tensor, idx: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """x[idx] on the training device. For host-resident images (--data-device cpu) the indices
    are read back (one host sync per batch) and the uint8 batch is copied to the device before
    augmentation, so the same pixels reach the same random ops as with device-resident data."""
    if x.device == idx.device:
        return x[idx]
    batch = x[idx.cpu()]
    return (batch.pin_memory() if x.is_pinned() else batch).to(dev, non_blocking=True)


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
CUTOUT_FILL_L = (123.0,)  # the grey in PIL's mode L: (19595*125 + 38470*123 + 7471*114 + 2^15) >> 16
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
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16 (exact in float32). A
    single-channel image is its own grayscale (PIL's convert("L") of an L image is a copy), so
    Color is the identity there and Contrast blends with the image's rounded mean."""
    if x.shape[1] == 1:
        return x
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


def weak(x: torch.Tensor, g: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """alpha: random horizontal flip, then a random translation of -pad..pad px in x and y with
    reflect padding (torchvision RandomHorizontalFlip + RandomCrop(padding=pad, 'reflect')).
    flip=False (--no-flip, e.g. digits) never flips; it still draws the flip coins, so the
    translations are the ones the flipping run draws. uint8 (N, C, H, W) in and out."""
    n, dev = x.shape[0], x.device
    flip = (torch.rand(n, generator=g, device=dev) < 0.5) & flip
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
    """Fill pixels y0 <= y < y1, x0 <= x < x1 of each image with the grey (125, 123, 114), or
    its grayscale value 123 for single-channel images."""
    n, c, h, w = x.shape
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    in_x = (xs >= x0.view(n, 1, 1)) & (xs < x1.view(n, 1, 1))  # (n, 1, w): separable, cheap
    in_y = (ys >= y0.view(n, 1, 1)) & (ys < y1.view(n, 1, 1))  # (n, h, 1)
    box = (in_y & in_x).unsqueeze(1)
    fill = _const(CUTOUT_FILL if c == 3 else CUTOUT_FILL_L, x.device, x.dtype).view(1, c, 1, 1)
    return x * ~box + fill * box  # exact (0/1 masks), and much cheaper than where on CPU


def strong(x: torch.Tensor, g: torch.Generator, flip: bool = True) -> torch.Tensor:
    """A: weak, RandAugment(3 ops), Cutout. uint8 (N, C, H, W) in and out."""
    return cutout(_rand_augment_(weak(x, g, flip=flip), g), g)


class Normalize:
    """(x / 255 - mean) / std per channel (as many channels as mean has), optionally to
    channels_last (for the conv net). Images on another device (host-resident data, --data-device
    cpu) are moved to this one first."""

    def __init__(self, mean: list[float], std: list[float], device, channels_last: bool = False):
        c = len(mean)
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, c, 1, 1)
        self.shift = (torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, c, 1, 1)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.device, non_blocking=True)  # no-op for device-resident data
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
    p = argparse.ArgumentParser(description="Build a class-balanced subset of a dataset in the "
                                "project's npz: format, e.g. the CPU-scale set: "
                                "python data.py make-subset --out cifar10-5k.npz",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=["make-subset"])
    p.add_argument("--dataset", default="cifar10", help=DATASET_HELP)
    p.add_argument("--data-dir", default="data", help="where the dataset is (or is downloaded to)")
    p.add_argument("--per-class-train", type=int, default=500, help="training images per class")
    p.add_argument("--per-class-test", type=int, default=100, help="test images per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class choice")
    p.add_argument("--out", required=True, help="the .npz file to write")
    a = p.parse_args(argv)
    if a.per_class_train < 1 or a.per_class_test < 1:
        p.error("--per-class-train and --per-class-test must be >= 1")
    if not a.out.endswith(".npz"):
        p.error(f"--out must end in .npz, got {a.out}")
    src = a.dataset[4:] if a.dataset.startswith("npz:") else None
    if src and os.path.exists(a.out) and os.path.exists(src) and os.path.samefile(src, a.out):
        p.error(f"--out {a.out} is the input dataset {src}; writing it would replace the source: "
                f"name another file")
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
