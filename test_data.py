"""data.py: datasets, split, sampler, and every augmentation op against PIL / torchvision."""
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

import data

SHARED_NPZ = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data",
                          "cifar10-5k.npz")


def real_images(n=48):
    """Real CIFAR images when ../shared is there; otherwise smooth synthetic 32x32 images with
    edges, flat areas and saturated pixels (so every op has something to do)."""
    if os.path.exists(SHARED_NPZ):
        return np.load(SHARED_NPZ)["x_train"][:n]
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 4, 4, generator=g) * 300 - 20
    x = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
    x = x + 25 * torch.randn(n, 3, 32, 32, generator=g)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- PIL reference (USB's RandAugment ops)

def pil_op(img, name, v):
    w, h = img.size
    return {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(v),
        "Color": lambda: ImageEnhance.Color(img).enhance(v),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(v),
        "Equalize": lambda: ImageOps.equalize(img),
        "Identity": lambda: img,
        "Posterize": lambda: ImageOps.posterize(img, int(v)),
        "Rotate": lambda: img.rotate(v),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(v),
        "ShearX": lambda: img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "ShearY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "Solarize": lambda: ImageOps.solarize(img, v),
        "TranslateX": lambda: img.transform(img.size, Image.AFFINE, (1, 0, v * w, 0, 1, 0)),
        "TranslateY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * h)),
    }[name]()


def nchw(x_nhwc):
    return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def op_magnitudes(name: str, n: int, seed: int) -> torch.Tensor:
    """n magnitudes spread over the op's whole range, the two ends included, as float32 (what
    the training pipeline draws)."""
    lo, hi = data.RANGES[name]
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    u[:2] = torch.tensor([0.0, 1.0])
    return (lo + (hi - lo) * u).float()


@pytest.mark.parametrize("name", data.OPS)
@pytest.mark.parametrize("subset", [True, False])
def test_each_op_equals_pil_exactly(name, subset):
    """0 differing pixels, each image at its own random magnitude (192 per op, on real images
    when ../shared is there), on both the per-op-slice (CPU) and the whole-batch (CUDA) path."""
    x_np = np.concatenate([real_images()] * 4)
    v = op_magnitudes(name, len(x_np), seed=data.OP[name])
    ref = np.stack([np.asarray(pil_op(Image.fromarray(im), name, float(m))) for im, m in zip(x_np, v)])
    out = data.apply_ops(nchw(x_np), torch.full((len(x_np),), data.OP[name]), v, subset=subset)
    assert out.dtype == torch.uint8
    bad = (out.permute(0, 2, 3, 1).numpy() != ref).any(axis=(1, 2, 3))
    assert not bad.any(), f"{name}: {bad.sum()} of {len(bad)} images differ, e.g. at v = {v[bad][:3]}"


def test_mixed_ops_in_one_batch_match_per_image_pil_and_both_paths_agree():
    x_np = np.concatenate([real_images(56)] * 2)
    n = len(x_np)
    g = torch.Generator().manual_seed(3)
    op = torch.arange(n) % len(data.OPS)
    lo, hi = torch.tensor(data.LOW)[op], torch.tensor(data.HIGH)[op]
    v = lo + (hi - lo) * torch.rand(n, generator=g)
    a = data.apply_ops(nchw(x_np), op, v, subset=True)
    b = data.apply_ops(nchw(x_np), op, v, subset=False)
    assert torch.equal(a, b)
    ref = np.stack([np.asarray(pil_op(Image.fromarray(x_np[i]), data.OPS[op[i]], v[i].item()))
                    for i in range(n)])
    assert np.array_equal(a.permute(0, 2, 3, 1).numpy(), ref)


def test_flip_translate_matches_torchvision():
    x_np = real_images(8)
    x = nchw(x_np)
    flip = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    dy = torch.tensor([-4, 4, 0, 2, -1, 3, -3, 1])
    dx = torch.tensor([4, -4, 1, 0, -2, -3, 3, 2])
    out = data.flip_translate(x, flip, dy, dx)
    for i in range(8):
        img = TF.hflip(x[i]) if flip[i] else x[i]
        padded = TF.pad(img, [4, 4, 4, 4], padding_mode="reflect")
        ref = TF.crop(padded, 4 + int(dy[i]), 4 + int(dx[i]), 32, 32)
        assert torch.equal(out[i], ref), i


def test_cutout_box_matches_pil_rectangle_and_area():
    x = nchw(real_images(4))
    y0, x0, y1, x1 = (torch.tensor(t, dtype=torch.float32) for t in
                      ([0, 5, 20, 31], [3, 0, 16, 30], [10, 6, 32, 32], [9, 16, 32, 32]))
    out = data.fill_box(x, y0, x0, y1, x1)
    for i in range(4):
        img = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        ImageDraw.Draw(img).rectangle((int(x0[i]), int(y0[i]), int(x1[i]) - 1, int(y1[i]) - 1),
                                      (125, 123, 114))
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), np.asarray(img))
    # random cutout: the grey area is at most (0.5 W)^2 and on average near E[s^2] = (0.5 W)^2 / 3
    ones = torch.zeros(4000, 3, 32, 32, dtype=torch.uint8)
    out = data.cutout(ones, torch.Generator().manual_seed(0))
    area = (out[:, 0] == 125).float().sum((1, 2))
    assert area.max() <= 16 * 16
    assert 0.55 * 256 / 3 < area.mean() < 256 / 3  # clipping at the border and flooring shrink it


def test_strong_and_weak_keep_shape_range_and_vary_per_image():
    x = nchw(real_images(32))
    g = torch.Generator().manual_seed(0)
    for fn in (data.weak, data.strong):
        out = fn(x, g)
        assert out.shape == x.shape and out.dtype == torch.uint8
    same = nchw(np.repeat(real_images(1), 64, 0))
    out = data.strong(same, g)
    flat = out.view(64, -1)
    assert len({tuple(r.tolist()[:400]) for r in flat}) > 60  # each image drew its own ops


def test_float_images_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        data.apply_ops(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2))


def test_rand_augment_draws_ops_and_magnitudes_per_image():
    g = torch.Generator().manual_seed(1)
    calls = []
    orig = data.apply_ops

    def spy(x, op, v, subset=None, inplace=False):
        calls.append((op.clone(), v.clone()))
        return orig(x, op, v, subset, inplace)

    data.apply_ops = spy
    try:
        data.rand_augment(torch.zeros(500, 3, 8, 8, dtype=torch.uint8), g)
    finally:
        data.apply_ops = orig
    assert len(calls) == 3
    for op, v in calls:
        counts = torch.bincount(op, minlength=14)
        assert counts.min() > 10  # every op is drawn, uniformly-ish
        assert torch.all(v >= torch.tensor(data.LOW)[op]) and torch.all(v <= torch.tensor(data.HIGH)[op])
        assert len(set(v.tolist())) > 400
    assert not torch.equal(calls[0][0], calls[1][0])


def test_same_seed_same_batch():
    x = nchw(real_images(16))
    a = data.strong(x, torch.Generator().manual_seed(5))
    b = data.strong(x, torch.Generator().manual_seed(5))
    c = data.strong(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normalize_uses_channel_stats():
    x_np = real_images(16)
    mean, std = data.channel_stats(x_np)
    out = data.Normalize(mean, std, "cpu", channels_last=True)(nchw(x_np))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(out.std((0, 2, 3)), torch.ones(3), atol=1e-2)


# ---------------------------------------------------------------- split and sampler

def test_split_counts_determinism_and_errors():
    y = np.repeat(np.arange(10), 50)
    np.random.default_rng(0).shuffle(y)
    a = data.split_labeled(y, 4, seed=0)
    assert len(a) == 40 and np.all(np.bincount(y[a], minlength=10) == 4)
    assert len(set(a.tolist())) == 40
    assert np.array_equal(a, data.split_labeled(y, 4, seed=0))
    assert not np.array_equal(a, data.split_labeled(y, 4, seed=1))
    with pytest.raises(ValueError, match="fewer"):
        data.split_labeled(y, 51, seed=0)
    with pytest.raises(ValueError):
        data.split_labeled(y, 0, seed=0)


def test_sampler_reshuffles_covers_and_resumes():
    g = torch.Generator().manual_seed(0)
    s = data.IndexSampler(10, 4, g)
    seen = torch.cat([s.next() for _ in range(5)])  # 20 indices = two full passes
    assert sorted(seen.tolist()) == sorted(list(range(10)) * 2)
    assert seen[:10].tolist() != seen[10:].tolist()
    state = s.state_dict()
    after = [s.next() for _ in range(3)]
    s2 = data.IndexSampler(10, 4, torch.Generator())
    s2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, [s2.next() for _ in range(3)]))
    big = data.IndexSampler(3, 8, torch.Generator().manual_seed(0)).next()  # batch > set size
    assert len(big) == 8 and set(big.tolist()) == {0, 1, 2}


# ---------------------------------------------------------------- datasets

def write_npz(path, **over):
    rng = np.random.default_rng(0)
    d = {"x_train": rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8),
         "y_train": np.arange(30) % 3, "x_test": rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
         "y_test": np.arange(6) % 3, "classes": np.array(["a", "b", "c"])}
    d.update(over)
    np.savez(path, **{k: v for k, v in d.items() if v is not None})
    return str(path)


def test_npz_round_trip(tmp_path):
    p = write_npz(tmp_path / "ok.npz")
    d = data.load_dataset("npz:" + p)
    raw = np.load(p)
    assert np.array_equal(d["x_train"], raw["x_train"]) and d["classes"] == ["a", "b", "c"]
    assert d["num_classes"] == 3 and d["y_train"].dtype == np.int64


@pytest.mark.parametrize("over,msg", [
    ({"x_test": None}, "missing"),
    ({"x_train": np.zeros((30, 8, 8), np.uint8)}, "shape"),
    ({"x_train": np.zeros((30, 8, 8, 3), np.float32)}, "uint8"),
    ({"y_train": np.arange(29) % 3}, "shape"),
    ({"y_train": (np.arange(30) % 3).astype(np.float32)}, "integers"),
    ({"y_train": np.arange(30) % 4}, "lie in"),
    ({"y_test": -np.ones(6, np.int64)}, r"y_test holds negative labels \(smallest -1\)"),
    ({"x_test": np.zeros((6, 9, 9, 3), np.uint8)}, "x_test images are 9 x 9 with 3 channels but "
                                                    "x_train images are 8 x 8 with 3 channels"),
])
def test_npz_errors(tmp_path, over, msg):
    p = write_npz(tmp_path / "bad.npz", **over)
    with pytest.raises(ValueError, match=msg):
        data.load_dataset("npz:" + p)


def test_unknown_dataset_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="does not exist"):
        data.load_dataset("npz:" + str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an .npz archive"):
        data.load_dataset("npz:" + str(tmp_path / "junk.npz"))


def test_cifar_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", no_network)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    with pytest.raises(RuntimeError) as e:
        data.load_dataset("cifar10", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and "cifar-10-python.tar.gz" in msg and "\n" not in msg


def test_cifar_corrupt_folder_is_one_clear_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="incomplete or corrupt"):
        data.load_dataset("cifar10", str(tmp_path))


def fake_cifar10(root, monkeypatch, labels):
    """A fake cifar-10-batches-py in the original pickle layout (integrity check bypassed):
    each of the 5 train batches and the test batch holds one image per entry of `labels`."""
    import pickle

    import torchvision
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
                         "labels": list(labels)}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


def test_cifar10_loads_from_torchvision_layout(tmp_path, monkeypatch):
    fake_cifar10(tmp_path, monkeypatch, range(4))
    d = data.load_dataset("cifar10", str(tmp_path))
    assert d["x_train"].shape == (20, 32, 32, 3) and d["x_test"].shape == (4, 32, 32, 3)
    assert d["num_classes"] == 10 and d["classes"][3] == "class3"
    assert d["y_train"].tolist() == [0, 1, 2, 3] * 5


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY",
                                  "Sharpness", "Equalize"])
@pytest.mark.parametrize("subset", [True, False])
def test_ops_on_non_square_images_equal_pil(name, subset):
    x_np = np.ascontiguousarray(np.concatenate([real_images(48)[:, 3:27, :]] * 2))  # 24 x 32
    v = op_magnitudes(name, len(x_np), seed=100 + data.OP[name])
    ref = np.stack([np.asarray(pil_op(Image.fromarray(im), name, float(m))) for im, m in zip(x_np, v)])
    out = data.apply_ops(nchw(x_np), torch.full((len(x_np),), data.OP[name]), v, subset=subset)
    assert np.array_equal(out.permute(0, 2, 3, 1).numpy(), ref)


def test_make_subset_from_a_cifar_folder(tmp_path, monkeypatch, capsys):
    """python data.py make-subset: per class the seeded first n train / test images, in the npz:
    format, loadable by load_npz; another seed picks others; too many per class is one line."""
    fake_cifar10(tmp_path, monkeypatch, list(range(10)) * 3)  # 15 train, 3 test per class
    full = data.load_dataset("cifar10", str(tmp_path))
    out = tmp_path / "sub.npz"
    argv = ["make-subset", "--data-dir", str(tmp_path), "--per-class-train", "4",
            "--per-class-test", "2", "--out", str(out)]
    data.main(argv)
    assert "40 train + 20 test images, 10 classes" in capsys.readouterr().out
    sub = data.load_npz(str(out))
    assert np.bincount(sub["y_train"]).tolist() == [4] * 10
    assert np.bincount(sub["y_test"]).tolist() == [2] * 10
    assert sub["classes"] == full["classes"]
    for split in ("train", "test"):  # every image is an original image of its class
        originals = {(full[f"y_{split}"][i], full[f"x_{split}"][i].tobytes())
                     for i in range(len(full[f"y_{split}"]))}
        assert all((y, x.tobytes()) in originals for x, y in zip(sub[f"x_{split}"], sub[f"y_{split}"]))
    data.main(argv[:-1] + [str(tmp_path / "again.npz")])
    assert np.array_equal(np.load(tmp_path / "again.npz")["x_train"], sub["x_train"])  # seeded
    data.main(argv[:-1] + [str(tmp_path / "seed1.npz"), "--seed", "1"])
    assert not np.array_equal(np.load(tmp_path / "seed1.npz")["x_train"], sub["x_train"])
    with pytest.raises(SystemExit) as e:
        data.main(argv[:3] + ["--per-class-train", "16", "--out", str(tmp_path / "x.npz")])
    assert "fewer than the 16 asked for" in str(e.value) and not (tmp_path / "x.npz").exists()
