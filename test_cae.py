"""Roda & Geva's CAE + clustering active learning: loaders, equations, query, driver."""
import bz2
import gzip
import os

import numpy as np
import pytest

import data


# ---------------------------------------------------------------- MNIST-family loaders

def write_idx(path: str, a: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, ">i4").tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + a.astype(np.uint8).tobytes())


def fake_idx_dir(folder, n_train=12, n_test=5, size=28, gz=True, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {"x_train": rng.integers(0, 256, (n_train, size, size)),
              "y_train": rng.integers(0, 10, n_train),
              "x_test": rng.integers(0, 256, (n_test, size, size)),
              "y_test": rng.integers(0, 10, n_test)}
    for k, stem in data.IDX_FILES.items():
        write_idx(os.path.join(folder, stem + (".gz" if gz else "")), arrays[k])
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_read_directly(tmp_path, gz):
    ref = fake_idx_dir(tmp_path, gz=gz)
    d = data.load_mnist_family("fashionmnist", str(tmp_path))
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(d[k], ref[k])
    assert d["x_train"].dtype == np.uint8 and d["x_train"].shape == (12, 28, 28)
    assert d["y_train"].dtype == np.int64
    assert d["num_classes"] == 10 and d["classes"][0] == "T-shirt/top"
    assert data.load_mnist_family("mnist", str(tmp_path))["classes"] == [str(i) for i in range(10)]


def test_torchvision_layout_read_without_download(tmp_path, monkeypatch):
    ref = fake_idx_dir(tmp_path / "MNIST" / "raw", gz=False)
    import torchvision
    monkeypatch.setattr(torchvision.datasets, "MNIST", None)  # any download attempt would fail
    d = data.load_mnist_family("mnist", str(tmp_path))
    assert np.array_equal(d["x_test"], ref["x_test"])


def one_line_error(fn, *a, kind=(ValueError, RuntimeError)) -> str:
    with pytest.raises(kind) as e:
        fn(*a)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_offline_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import torchvision

    def no_network(*a, **k):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)
    monkeypatch.setattr(torchvision.datasets.usps, "download_url", no_network)
    for name in ("mnist", "fashionmnist", "usps"):
        target = tmp_path / f"new-{name}"
        msg = one_line_error(data.load_mnist_family, name, str(target), kind=RuntimeError)
        assert "could not be downloaded" in msg and str(target) in msg
        assert ("usps.bz2" if name == "usps" else "train-images-idx3-ubyte.gz") in msg
        assert not target.exists()


def test_partial_corrupt_and_unknown_are_one_line(tmp_path):
    fake_idx_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    assert "t10k-labels-idx1-ubyte" in one_line_error(data.load_mnist_family, "mnist", str(tmp_path))
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.zeros(4))  # 4 labels, 5 images
    assert "do not match" in one_line_error(data.load_mnist_family, "mnist", str(tmp_path))
    with open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))  # says 9, holds 3
    assert "truncated" in one_line_error(data.load_mnist_family, "mnist", str(tmp_path))
    with open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"not gzip at all")
    assert "cannot be read" in one_line_error(data.load_mnist_family, "mnist", str(tmp_path))
    assert "unknown dataset" in one_line_error(data.load_mnist_family, "kmnist", str(tmp_path))


def write_usps(path, x01: np.ndarray, y: np.ndarray) -> None:
    lines = [f"{c + 1} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(row * 2 - 1))
             for c, row in zip(y, x01.reshape(len(x01), -1))]
    with bz2.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


def test_usps_files_read(tmp_path):
    rng = np.random.default_rng(1)
    x01, y = rng.integers(0, 2, (6, 16, 16)).astype(float), rng.integers(0, 10, 6)
    write_usps(tmp_path / "usps.bz2", x01, y)
    write_usps(tmp_path / "usps.t.bz2", x01[:3], y[:3])
    d = data.load_mnist_family("usps", str(tmp_path))
    assert d["x_train"].shape == (6, 16, 16) and d["x_train"].dtype == np.uint8
    assert np.array_equal(d["x_train"], (x01 * 255).astype(np.uint8))
    assert np.array_equal(d["y_train"], y) and len(d["y_test"]) == 3 and d["num_classes"] == 10
    with open(tmp_path / "usps.t.bz2", "wb") as f:
        f.write(b"junk")
    assert "usps.t.bz2" in one_line_error(data.load_mnist_family, "usps", str(tmp_path))
