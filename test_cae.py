"""Roda & Geva's CAE + clustering active learning: loaders, equations, query, driver."""
import bz2
import copy
import gzip
import os
import shutil

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


# ---------------------------------------------------------------- equations vs float64 loops

import math  # noqa: E402

import torch  # noqa: E402

import cae_al  # noqa: E402
import losses  # noqa: E402
import model  # noqa: E402


def rand_latents(n=13, k=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * 2,
            torch.randn(k, d, generator=g, dtype=torch.float64) * 2,
            torch.randint(0, k, (n,), generator=g))


def loop_q(z, mu, alpha=1.0):
    q = [[(1 + sum((z[i][d] - mu[j][d]) ** 2 for d in range(len(z[0]))) / alpha) ** (-(alpha + 1) / 2)
          for j in range(len(mu))] for i in range(len(z))]
    return [[v / sum(row) for v in row] for row in q]


def test_soft_assign_eq1():
    z, mu, _ = rand_latents()
    ref = loop_q(z.tolist(), mu.tolist())
    assert torch.allclose(losses.soft_assign(z, mu), torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    ref2 = loop_q(z.tolist(), mu.tolist(), alpha=2.0)
    assert torch.allclose(losses.soft_assign(z, mu, 2.0), torch.tensor(ref2, dtype=torch.float64))
    assert torch.allclose(losses.soft_assign(mu, mu).argmax(1), torch.arange(4))  # z on a centroid
    with pytest.raises(ValueError, match="same D"):
        losses.soft_assign(z, mu[:, :2])


def test_target_distribution_eq3_and_kl_eq2():
    z, mu, _ = rand_latents()
    q = loop_q(z.tolist(), mu.tolist())
    n, k = len(q), len(q[0])
    f = [sum(q[i][j] for i in range(n)) for j in range(k)]
    p = [[q[i][j] ** 2 / f[j] for j in range(k)] for i in range(n)]
    p = [[v / sum(row) for v in row] for row in p]
    kl = sum(p[i][j] * math.log(p[i][j] / q[i][j]) for i in range(n) for j in range(k)) / n
    qt = torch.tensor(q, dtype=torch.float64)
    pt = losses.target_distribution(qt)
    assert torch.allclose(pt, torch.tensor(p, dtype=torch.float64), atol=1e-12)
    assert abs(float(losses.kl_clustering(pt, qt)) - kl) < 1e-12
    assert float(losses.kl_clustering(qt, qt)) == pytest.approx(0, abs=1e-12)
    p0 = pt.clone()
    p0[0] = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)  # 0 log 0 = 0, no NaN
    assert torch.isfinite(losses.kl_clustering(p0, qt))
    with pytest.raises(ValueError, match="same shape"):
        losses.kl_clustering(pt, qt[:3])


def loop_ccl(z, y, mu, tau, include_positive):
    n, total = len(z), 0.0
    dot = lambda a, b: sum(x * w for x, w in zip(a, b))  # noqa: E731
    for i in range(n):
        c = y[i]
        negs = [math.exp(dot(z[k], mu[c]) / tau) for k in range(n) if y[k] != c]
        if not negs:
            continue
        pos = math.exp(dot(z[i], mu[c]) / tau)
        total -= math.log(pos / (sum(negs) + (pos if include_positive else 0.0)))
    return total / n


@pytest.mark.parametrize("include_positive", [False, True])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_cluster_contrastive_eq7(include_positive, tau):
    z, mu, y = rand_latents(n=17, k=4, d=3, seed=1)
    ref = loop_ccl(z.tolist(), y.tolist(), mu.tolist(), tau, include_positive)
    got = losses.cluster_contrastive(z, y, mu, tau, include_positive)
    assert abs(float(got) - ref) < 1e-10


def test_cluster_contrastive_edge_cases():
    z, mu, _ = rand_latents(n=5, k=3, d=3, seed=2)
    z.requires_grad_(True)
    one_class = torch.zeros(5, dtype=torch.long)       # no negatives at all: nothing to contrast
    loss = losses.cluster_contrastive(z, one_class, mu)
    loss.backward()
    assert float(loss.detach()) == 0 and torch.isfinite(z.grad).all()
    # as printed the loss is unbounded below: stretching z along its centroid lowers it forever
    mu2, y2 = torch.eye(3, dtype=torch.float64), torch.arange(12) % 3
    z2 = mu2[y2]                                       # each latent on its own centroid's axis
    vals = [float(losses.cluster_contrastive(s * z2, y2, mu2)) for s in (1, 10, 100)]
    info = [float(losses.cluster_contrastive(s * z2, y2, mu2, include_positive=True)) for s in (1, 10, 100)]
    assert vals[0] > vals[1] > vals[2] and vals[2] == pytest.approx(math.log(8) - 100)
    assert min(info) >= 0 and info[2] < 1e-30
    with pytest.raises(ValueError, match="tau"):
        losses.cluster_contrastive(z2, y2, mu2, tau=0)
    with pytest.raises(ValueError, match="one per latent row"):
        losses.cluster_contrastive(z2, y2[:3], mu2)


def test_cluster_entropy_for_query():
    z, mu, _ = rand_latents()
    q = loop_q(z.tolist(), mu.tolist())
    ref = [-sum(v * math.log(v) for v in row) for row in q]
    got = losses.entropy(losses.soft_assign(z, mu), validate=False)
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64), atol=1e-12)


def test_centroids_are_labeled_class_means():
    z, _, y = rand_latents(n=20, k=4, d=3, seed=4)
    clu = model.ClusteringLayer(4, 3)
    clu.init_from(z.float(), y)
    for c in range(4):
        rows = [z[i].tolist() for i in range(20) if y[i] == c]
        mean = [sum(r[d] for r in rows) / len(rows) for d in range(3)]
        assert torch.allclose(clu.mu[c].double(), torch.tensor(mean, dtype=torch.float64), atol=1e-6)
    y_missing = y.clone()
    y_missing[y_missing == 2] = 1
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        clu.init_from(z.float(), y_missing)


@pytest.mark.parametrize("size,s3", [(28, 3), (16, 2)])
def test_cae_shapes(size, s3):
    cae = model.CAE(size)
    x = torch.rand(3, 1, size, size)
    z = cae.encode(x)
    assert z.shape == (3, 10) and cae.s3 == s3 and cae.decode(z).shape == x.shape
    assert [m.out_channels for m in (cae.conv1, cae.conv2, cae.conv3)] == [32, 64, 128]
    assert [m.kernel_size for m in (cae.conv1, cae.conv2, cae.conv3)] == [(5, 5), (5, 5), (3, 3)]
    with pytest.raises(ValueError, match="at least 8"):
        model.CAE(6)


def _loop_conv_transpose(x, w, b, stride, pad, size):
    """The transposed convolution by its definition, float64 loops: every input pixel (i, j)
    adds x[c, i, j] * w[c, o, u, v] at output (i s - p + u, j s - p + v) when that lies inside."""
    n, c_in, h, wd = x.shape
    c_out, k = w.shape[1], w.shape[2]
    y = torch.zeros(n, c_out, *size, dtype=torch.float64)
    for i in range(h):
        for j in range(wd):
            for u in range(k):
                for v in range(k):
                    r, c = i * stride - pad + u, j * stride - pad + v
                    if 0 <= r < size[0] and 0 <= c < size[1]:
                        y[:, :, r, c] += x[:, :, i, j] @ w[:, :, u, v]
    return y + b.view(1, -1, 1, 1)


@pytest.mark.parametrize("size,channels", [(28, 1), (16, 1), (28, 3)])
def test_conv_transpose_fold_is_the_transposed_convolution(size, channels):
    """The CAE's fast last layer: equal to its definition (loops) and to nn.ConvTranspose2d, in
    value and in the gradients of input, weight and bias, for 28 x 28 and 16 x 16 images."""
    torch.manual_seed(0)
    cae = model.CAE(size, channels).double()
    layer, s1 = cae.deconv1, cae.size // 2
    x = torch.randn(2, 32, s1, s1, dtype=torch.float64, requires_grad=True)
    got = model.conv_transpose_fold(x, layer, (size, size))
    want = layer(x)
    assert got.shape == want.shape == (2, channels, size, size)
    torch.testing.assert_close(got, _loop_conv_transpose(x.detach(), layer.weight.detach(),
                                                         layer.bias.detach(), 2, 2, (size, size)))
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    grads = [torch.autograd.grad((out * g).sum(), [x, layer.weight, layer.bias])
             for out in (got, layer(x))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size", [28, 16])
def test_cae_fast_path_and_channels_last_compute_the_plain_network(size):
    """fold_last and channels-last (what cae_al.py runs) give the plain network's reconstruction
    and parameter gradients, up to float32 rounding."""
    torch.manual_seed(0)
    plain = model.CAE(size, fold_last=False)
    fast = copy.deepcopy(plain)
    fast.fold_last = True
    fast = fast.to(memory_format=torch.channels_last)
    x = torch.rand(8, 1, size, size)
    outs = []
    for m in (plain, fast):
        loss = torch.nn.functional.mse_loss(m.decode(m.encode(x)), x)
        outs.append((loss, torch.autograd.grad(loss, list(m.parameters()))))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="groups 1"):
        model.conv_transpose_fold(x, torch.nn.ConvTranspose2d(2, 2, 3, groups=2), (3, 3))
    h = torch.rand(2, 32, size // 2, size // 2)
    with pytest.raises(ValueError, match=f"not to \\({size - 1}, {size - 1}\\)"):
        model.conv_transpose_fold(h, fast.deconv1, (size - 1, size - 1))  # would crop silently


# ---------------------------------------------------------------- queries and split

def test_entropy_ranking_and_tie_break():
    h = np.array([0.5, 0.9, 0.9, 0.1, 0.9, 0.7])
    cand = np.array([0, 2, 3, 4, 5])                  # position 1 is labeled already
    assert cae_al.rank_entropy(h, cand, 2).tolist() == [2, 4]
    assert cae_al.rank_entropy(h, cand, 3).tolist() == [2, 4, 5]
    rng = np.random.default_rng(0)
    h = rng.integers(0, 4, 50).astype(float)          # many ties
    cand = np.sort(rng.choice(50, 30, replace=False))
    ref = sorted(cand.tolist(), key=lambda i: (-h[i], i))[:12]
    assert cae_al.rank_entropy(h, cand, 12).tolist() == sorted(ref)
    with pytest.raises(ValueError, match="only 5 unlabeled"):
        cae_al.rank_entropy(h, cand[:5], 6)


def loop_kcenter(z, labeled, n):
    centers, chosen = list(labeled), []
    for _ in range(n):
        best, best_d = None, -1.0
        for i in range(len(z)):
            if i in centers:
                continue
            d = min(math.dist(z[i], z[c]) for c in centers)
            if d > best_d:                                 # strict: the lowest index wins ties
                best, best_d = i, d
        centers.append(best)
        chosen.append(best)
    return sorted(chosen)


def test_kcenter_greedy_vs_loop():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(40, 3))
    z[20] = z[10]                                          # duplicates: ties by index
    labeled = np.array([0, 7, 33])
    assert cae_al.kcenter_greedy(z, labeled, 8).tolist() == loop_kcenter(z.tolist(), labeled.tolist(), 8)
    zt = np.array([[0.0], [1.0], [-1.0], [5.0]])           # 1 and 2 tie; 3 is farthest
    assert cae_al.kcenter_greedy(zt, np.array([0]), 2).tolist() == [1, 3]
    same = np.zeros((4, 2))                                 # all distances 0: still new points
    assert cae_al.kcenter_greedy(same, np.array([1]), 3).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="cannot query 38"):
        cae_al.kcenter_greedy(z, labeled, 38)


def test_split_disjoint_and_seeded():
    pool, val, lab = cae_al.split_pool(1000, 0.2, 25, seed=3)
    assert len(val) == 200 and len(pool) == 800 and len(np.intersect1d(pool, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([pool, val])), np.arange(1000))
    assert len(np.unique(lab)) == 25 and lab.max() < 800
    again = cae_al.split_pool(1000, 0.2, 25, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((pool, val, lab), again))
    other = cae_al.split_pool(1000, 0.2, 25, seed=4)
    assert not np.array_equal(val, other[1])
    with pytest.raises(ValueError, match="larger than the pool"):
        cae_al.split_pool(100, 0.2, 81, seed=0)


# ---------------------------------------------------------------- the driver: resume, skip, bad input

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def make_tiny(folder) -> str:
    """120 train / 20 test 16 x 16 images, a class-dependent blob plus noise, in IDX files."""
    rng = np.random.default_rng(0)
    y_all = np.arange(140) % 10
    yy, xx = np.mgrid[:16, :16]
    blobs = [np.exp(-((yy - 3 - c // 5 * 8) ** 2 + (xx - 1 - c % 5 * 3) ** 2) / 6) for c in range(10)]
    x_all = np.clip(np.stack([blobs[c] for c in y_all]) * 220 + rng.normal(0, 20, (140, 16, 16)),
                    0, 255)
    for k, arr in (("x_train", x_all[:120]), ("y_train", y_all[:120]), ("x_test", x_all[120:]),
                   ("y_test", y_all[120:])):
        write_idx(str(folder / (data.IDX_FILES[k] + ".gz")), arr)
    return str(folder)


def tiny_argv(data_dir, out, *extra):
    return ["--dataset", "mnist", "--data-dir", data_dir, "--out", str(out), "--seed", "1",
            "--init-labels", "40", "--query-size", "10", "--rounds", "2", "--pretrain-epochs", "2",
            "--epochs-per-round", "1", "--batch-size", "32", "--batch-lb", "16",
            "--update-interval", "3", *extra]


def final_state(out):
    s = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    hist = [{k: v for k, v in h.items() if k not in ("seconds", "timing")}
            for h in __import__("json").loads(s["history"])]
    return s, hist


def same_state(a, b):
    (sa, ha), (sb, hb) = a, b
    assert ha == hb
    assert np.array_equal(sa["labeled"].numpy(), sb["labeled"].numpy())
    for part in ("cae", "clu"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), (part, k)


class Killed(Exception):
    pass


def kill_after(monkeypatch, name, calls):
    real, n = getattr(cae_al, name), [0]

    def wrapped(*a, **k):
        n[0] += 1
        if n[0] > calls:
            raise Killed
        return real(*a, **k)
    monkeypatch.setattr(cae_al, name, wrapped)


@pytest.fixture(scope="module")
def runs_root(tiny_data, tmp_path_factory):
    """One straight entropy run, shared by the resume and the report tests."""
    root = tmp_path_factory.mktemp("runs")
    cae_al.main(tiny_argv(tiny_data, root / "entropy"))
    return root


def test_kill_and_resume_is_bitwise_and_finished_run_is_skipped(tiny_data, runs_root, tmp_path,
                                                                monkeypatch, capsys):
    straight = final_state(runs_root / "entropy")
    # killed in pre-training epoch 2, then (after resuming) in the middle of round 1
    with monkeypatch.context() as m:
        kill_after(m, "pretrain_epoch", 1)
        with pytest.raises(Killed):
            cae_al.main(tiny_argv(tiny_data, tmp_path / "killed"))
    with monkeypatch.context() as m:
        kill_after(m, "train_step", 4)               # a round is 1 epoch of 3 iterations
        with pytest.raises(Killed):
            cae_al.main(tiny_argv(tiny_data, tmp_path / "killed"))
    assert final_state(tmp_path / "killed")[0]["round"] == 1
    cae_al.main(tiny_argv(tiny_data, tmp_path / "killed"))
    same_state(straight, final_state(tmp_path / "killed"))
    # a finished run trains nothing
    monkeypatch.setattr(cae_al, "train_round", lambda *a: (_ for _ in ()).throw(AssertionError))
    capsys.readouterr()
    cae_al.main(tiny_argv(tiny_data, tmp_path / "killed"))
    assert "finished" in capsys.readouterr().out


def test_outputs_pretrained_reuse_and_report(tiny_data, runs_root, tmp_path, monkeypatch):
    root = runs_root
    cae_al.main(tiny_argv(tiny_data, root / "random", "--query", "random"))
    calls = []
    monkeypatch.setattr(cae_al, "pretrain_epoch", lambda run: calls.append(1))
    cae_al.main(tiny_argv(tiny_data, root / "random-reused", "--query", "random",
                          "--pretrained", str(root / "entropy")))
    assert not calls                                 # pre-training was taken over, identically
    same_state(final_state(root / "random"), final_state(root / "random-reused"))
    _, hist = final_state(root / "entropy")
    assert [h["labels"] for h in hist] == [40, 50, 60]
    lat = np.load(root / "entropy" / "latents.npz")
    assert lat["z"].shape == (96, 10) and len(lat["labeled"]) == 60
    text = cae_al.report(str(root))
    acc0 = f"{hist[0]['val_acc']:.3f}"                # all of the tiny pool is above 10 %
    assert f"| entropy + CCL | measured | {acc0} | {acc0} |" in text and "random + CCL" in text
    assert "± 0.000 | 2 |" in text                  # two random runs: mean and std
    fake = {"args": {"dataset": "fashionmnist", "query": "coreset", "no_ccl": True,
                     "ccl_form": "printed", "seed": 0}, "pool": 48000,
            "history": [{"labels": 250, "val_acc": 0.4}, {"labels": 500, "val_acc": 0.5},
                        {"labels": 1500, "val_acc": 0.6}]}
    os.makedirs(tmp_path / "fake" / "r")
    with open(tmp_path / "fake" / "r" / "result.json", "w") as f:
        __import__("json").dump(fake, f)
    text = cae_al.report(str(tmp_path / "fake"))
    assert "| core-set, clustering only | measured | 0.500 | 0.600 | not run | not run | 1 |" in text
    assert "| Ours (entropy + CCL) | published | 0.490 | 0.671 | 0.697 | 0.758 | - |" in text
    assert (root / "table.csv").exists()
    if __import__("importlib").util.find_spec("matplotlib"):   # the plot is an optional extra
        assert (root / "accuracy_vs_labels.png").exists()


def one_line_exit(argv) -> str:
    with pytest.raises(SystemExit) as e:
        cae_al.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("cae_al.py: error:") and "\n" not in msg
    return msg


def test_bad_input_is_one_line(tiny_data, tmp_path):
    assert "cannot query 200" in one_line_exit(tiny_argv(tiny_data, tmp_path / "a", "--query-size", "200",
                                                         "--pretrain-epochs", "0"))
    assert "larger than the pool" in one_line_exit(tiny_argv(tiny_data, tmp_path / "b", "--init-labels", "999"))
    assert "class(es)" in one_line_exit(tiny_argv(tiny_data, tmp_path / "c", "--init-labels", "3",
                                                  "--pretrain-epochs", "0"))
    cae_al.main(tiny_argv(tiny_data, tmp_path / "d", "--rounds", "0", "--pretrain-epochs", "1",
                          "--epochs-per-round", "0"))
    assert "--query 'entropy' (now 'random')" in one_line_exit(
        tiny_argv(tiny_data, tmp_path / "d", "--rounds", "0", "--pretrain-epochs", "1",
                  "--epochs-per-round", "0", "--query", "random"))
    assert "pretrained.pt does not exist" in one_line_exit(
        tiny_argv(tiny_data, tmp_path / "e", "--pretrained", str(tmp_path / "nowhere")))
    with open(tmp_path / "d" / "last.pt", "wb") as f:
        f.write(b"torn")
    assert "not a readable checkpoint" in one_line_exit(tiny_argv(tiny_data, tmp_path / "d"))



def test_resume_and_pretrained_refuse_other_data(tiny_data, tmp_path):
    quick = ("--rounds", "0", "--pretrain-epochs", "1", "--epochs-per-round", "0")
    cae_al.main(tiny_argv(tiny_data, tmp_path / "run", *quick))
    d = data.load_mnist_family("mnist", tiny_data)
    a = cae_al.parse_args(tiny_argv(tiny_data, tmp_path / "run"))
    pool = cae_al.split_pool(len(d["x_train"]), a.val_frac, a.init_labels, a.seed)[0]
    changes = {"other_test": {"y_test": 0}, "other_train": {"x_train": pool[0]},
               "relabeled": {"y_train": pool[0]}, "both": {"x_train": pool[0], "y_test": 0}}
    for name, change in changes.items():  # copies of the data with one image or label changed
        os.makedirs(tmp_path / name)
        for k in ("x_train", "y_train", "x_test", "y_test"):
            arr = d[k].copy()
            if k in change:
                i = change[k]
                arr[i] = (arr[i] + 1) % 10 if k.startswith("y") else 255 - arr[i]
            write_idx(str(tmp_path / name / (data.IDX_FILES[k] + ".gz")), arr)
    # resuming on any of them: refused, naming what changed and where
    for name, what in (("other_test", "other test images or labels than"),
                       ("other_train", "other training images or labels than"),
                       ("relabeled", "other training images or labels than"),
                       ("both", "other training images or labels and test images or labels")):
        msg = one_line_exit(tiny_argv(str(tmp_path / name), tmp_path / "run", *quick))
        assert what in msg and name in msg and "another --out" in msg, msg
    # pre-training saw the pool's images only: other labels or another test set may reuse it
    for name in ("other_test", "relabeled"):
        cae_al.main(tiny_argv(str(tmp_path / name), tmp_path / f"reuse-{name}", *quick,
                              "--pretrained", str(tmp_path / "run")))
    msg = one_line_exit(tiny_argv(str(tmp_path / "other_train"), tmp_path / "no", *quick,
                                  "--pretrained", str(tmp_path / "run")))
    assert "pretrained.pt was made on other training images than" in msg, msg
    assert "no --pretrained to pre-train on these files" in msg, msg
    # the same files elsewhere: the run resumes (it is finished, so it trains nothing)
    shutil.copytree(tiny_data, tmp_path / "copy")
    cae_al.main(tiny_argv(str(tmp_path / "copy"), tmp_path / "run", *quick))
    # a checkpoint from before the digests were kept resumes as it did then, unchecked
    s = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del s["data"], s["pool_images"]
    torch.save(s, tmp_path / "run" / "last.pt")
    cae_al.main(tiny_argv(str(tmp_path / "both"), tmp_path / "run", *quick))


def test_wrong_image_shape_and_missing_files_are_one_line(tiny_data, tmp_path, monkeypatch):
    import torchvision

    def no_network(*a, **k):
        raise OSError("Network is unreachable")
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)
    msg = one_line_exit(tiny_argv(str(tmp_path / "empty"), tmp_path / "g"))
    assert "could not be downloaded" in msg and "train-images-idx3-ubyte.gz" in msg
    real = data.load_mnist_family
    rgb = lambda *a: {**real(*a), "x_train": np.zeros((200, 16, 16, 3), np.uint8)}  # noqa: E731
    monkeypatch.setattr(data, "load_mnist_family", rgb)
    assert "square single-channel" in one_line_exit(tiny_argv(tiny_data, tmp_path / "h"))


def test_bench_cae_reports_its_own_ratios():
    import bench
    r = bench.bench_cae(repeat=1, size=16, batch=32, batch_lb=16, pool=320)
    assert r["images_s"] == pytest.approx(32e3 / r["step_ms"])
    assert r["vs_plain"] == pytest.approx(r["images_s"] / r["plain_images_s"])
    assert sum(r["time_share"].values()) == pytest.approx(1) and r["protocol_hours"] > 0


def test_target_refreshed_every_update_interval_iterations(tiny_data, tmp_path, monkeypatch):
    a = cae_al.parse_args(tiny_argv(tiny_data, tmp_path / "p", "--epochs-per-round", "3"))
    run = cae_al.Run(a, cae_al.load(a))
    lb = torch.from_numpy(run.labeled)
    run.clu.init_from(cae_al.encode_all(run.cae, run.x_pool[lb]), run.y_pool[lb])
    steps, refreshed, sizes = [0], [], []
    real_refresh, real_step = cae_al.refresh_target, cae_al.train_step

    def refresh(r):
        refreshed.append(steps[0])
        p = real_refresh(r)
        expect = losses.target_distribution(losses.soft_assign(
            cae_al.encode_all(r.cae, r.x_pool), r.clu.mu))           # over the whole pool, now
        assert torch.equal(p, expect)
        latest[0] = p
        return p
    latest = [None]

    def step(r, x, p, x_lb, y_lb):
        rows = (latest[0][:, None] == p[None]).all(-1).any(0)  # each row is a row of the latest P
        assert rows.all()
        sizes.append(len(y_lb))
        steps[0] += 1
        return real_step(r, x, p, x_lb, y_lb)
    monkeypatch.setattr(cae_al, "refresh_target", refresh)
    monkeypatch.setattr(cae_al, "train_step", step)
    cae_al.train_round(run, {"refresh_P": 0.0})
    assert steps[0] == 9 and refreshed == [0, 3, 6]                 # 3 epochs x 3 iterations
    assert sizes[:6] == [16, 16, 8] * 2       # the 40 labeled images cycle through permutations


def test_protocol_defaults_and_loss_wiring(tiny_data, tmp_path, monkeypatch):
    a = cae_al.parse_args(["--out", "x"])
    assert (a.dataset, a.val_frac, a.init_labels, a.query_size, a.rounds, a.epochs_per_round,
            a.pretrain_epochs, a.update_interval, a.query, a.ccl_form, a.no_ccl) == (
        "fashionmnist", 0.2, 250, 250, 20, 10, 50, 80, "entropy", "printed", False)
    u = cae_al.parse_args(["--out", "x", "--dataset", "usps"])
    assert (u.init_labels, u.query_size, u.rounds) == (75, 75, 9)
    calls = []
    real = losses.cluster_contrastive
    monkeypatch.setattr(losses, "cluster_contrastive",
                        lambda z, y, mu, tau, pos: calls.append((len(z), tau, pos)) or real(z, y, mu, tau, pos))
    for extra, expect in (([], (16, 1.0, False)), (["--ccl-form", "infonce", "--tau", "0.5"], (16, 0.5, True)),
                          (["--no-ccl"], None)):
        a = cae_al.parse_args(tiny_argv(tiny_data, tmp_path / "w", *extra))
        run = cae_al.Run(a, cae_al.load(a))
        p = cae_al.refresh_target(run)
        assert not p.requires_grad                     # P is a target: no gradient through it
        before = run.clu.mu.detach().clone()
        calls.clear()
        x = cae_al.batch(run.x_pool[:32])
        cae_al.train_step(run, x, p[:32], cae_al.batch(run.x_pool[:16]), run.y_pool[:16])
        assert calls == ([expect] if expect else [])
        assert not torch.equal(before, run.clu.mu)     # the centroids train (through KL and CCL)
