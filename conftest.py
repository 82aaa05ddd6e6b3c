"""Shared pytest fixtures: a tiny synthetic dataset and the train.py arguments of a tiny run."""
import numpy as np
import pytest


def write_tiny_npz(path, k=3, n_train=20, n_test=10, size=16, seed=0):
    """k classes of size x size images whose mean colour depends on the class (learnable)."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = np.arange(n * k) % k
        base = (np.eye(3)[y % 3] * 120 + 60)[:, None, None, :]
        x = base + rng.normal(0, 40, (n * k, size, size, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_tr, y_tr = make(n_train)
    x_te, y_te = make(n_test)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
             classes=np.array([f"c{i}" for i in range(k)]))
    return str(path)


@pytest.fixture
def tiny_npz(tmp_path):
    return write_tiny_npz(tmp_path / "tiny.npz")


def tiny_args(npz, out, *extra):
    return ["--dataset", f"npz:{npz}", "--labels-per-class", "2", "--arch", "wrn-10-1",
            "--batch-size", "4", "--mu", "2", "--epochs", "2", "--steps-per-epoch", "3",
            "--entropy-ratio", "0.5", "--ema-decay", "0.9", "--log-every", "1", "--out", str(out),
            "--device", "cpu", *extra]


def drop(args, *flags):
    """args without the given flags and their values."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def lt_args(npz, out, *extra):
    """tiny_args for the long-tailed split: 6 / 10 images of the head class, gamma 3."""
    return drop(tiny_args(npz, out), "--labels-per-class") + [
        "--lt-labeled", "6", "--lt-unlabeled", "10", "--imb-ratio-l", "3", *extra]
