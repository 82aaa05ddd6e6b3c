"""Own data: single-channel images end to end, x_unlabeled, folder:, STL-10 / SVHN / MNIST-family
files, --no-flip, --val-per-class, --data-device cpu. Small fake data only (no download)."""
import gzip
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import config
import data
import evaluate
import methods
import query
import train
from conftest import drop, tiny_args
from test_data import op_magnitudes, pil_op


def gray_images(n=24, size=16, seed=0):
    """Smooth grayscale images with edges, flat areas and saturated pixels."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 4, 4, generator=g) * 300 - 20
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    x = x + 25 * torch.randn(n, 1, size, size, generator=g)
    return x.clamp(0, 255).round().to(torch.uint8)


def write_gray_npz(path, k=3, n_train=8, n_test=4, n_unl=12, size=16, seed=0, **over):
    """k classes of grayscale (N, H, W) images whose brightness depends on the class, plus
    n_unl images without labels."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = np.arange(n * k) % k
        x = (y * 80 + 40)[:, None, None] + rng.normal(0, 30, (n * k, size, size))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    (x_tr, y_tr), (x_te, y_te) = make(n_train), make(n_test)
    arrays = dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                  classes=np.array([f"c{i}" for i in range(k)]))
    if n_unl:
        arrays["x_unlabeled"] = make(-(-n_unl // k))[0][:n_unl]
    arrays.update(over)
    np.savez(path, **arrays)
    return str(path)


# ---------------------------------------------------------------- one channel: ops against PIL "L"

@pytest.mark.parametrize("subset", [True, False])
def test_every_op_on_one_channel_equals_pil_mode_L(subset):
    """Each of the 14 ops on (N, 1, H, W) equals PIL's op on the same image in mode "L" (Color:
    the identity, since an L image is its own grayscale; Contrast: blend with its mean)."""
    x = gray_images(24)
    for name in data.OPS:
        v = op_magnitudes(name, len(x), seed=data.OP[name])
        out = data.apply_ops(x, torch.full((len(x),), data.OP[name]), v, subset=subset)
        ref = np.stack([np.asarray(pil_op(Image.fromarray(im[0].numpy(), "L"), name, float(m)))
                        for im, m in zip(x, v)])
        assert out.shape == x.shape
        bad = (out[:, 0].numpy() != ref).any(axis=(1, 2))
        assert not bad.any(), f"{name}: {bad.sum()} of {len(bad)} images differ"


def test_cutout_on_one_channel_fills_pils_grey_in_mode_L():
    grey = Image.new("RGB", (1, 1), (125, 123, 114)).convert("L").getpixel((0, 0))
    assert data.CUTOUT_FILL_L == (float(grey),)
    x = gray_images(3)
    y0, x0, y1, x1 = (torch.tensor(t, dtype=torch.float32) for t in ([0, 5, 9], [3, 0, 8],
                                                                       [10, 6, 16], [9, 16, 16]))
    out = data.fill_box(x, y0, x0, y1, x1)
    for i in range(3):
        img = Image.fromarray(x[i, 0].numpy(), "L")
        ImageDraw.Draw(img).rectangle((int(x0[i]), int(y0[i]), int(x1[i]) - 1, int(y1[i]) - 1), grey)
        assert np.array_equal(out[i, 0].numpy(), np.asarray(img))


def test_no_flip_never_flips_and_keeps_the_translations():
    x = gray_images(64)
    g = torch.Generator().manual_seed(5)
    torch.rand(64, generator=g)  # the flip coins are drawn either way
    dy = torch.randint(-4, 5, (64,), generator=g)
    dx = torch.randint(-4, 5, (64,), generator=g)
    ref = data.flip_translate(x, torch.zeros(64, dtype=torch.bool), dy, dx)
    assert torch.equal(data.weak(x, torch.Generator().manual_seed(5), flip=False), ref)
    flipped = data.weak(x, torch.Generator().manual_seed(5))
    assert not torch.equal(flipped, ref)  # the default flips some images


def test_normalize_and_stats_take_the_data_channel_count():
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    mean, std = data.channel_stats(x)
    assert len(mean) == 1 and mean[0] == pytest.approx(x.mean() / 255)
    out = data.Normalize(mean, std, "cpu")(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    assert out.shape == (5, 1, 8, 8) and out.mean().item() == pytest.approx(0, abs=1e-5)
    # with images without labels: exact integer sums over both sets
    ds = {"x_train": x, "x_unlabeled": x[:2] // 2}
    both = np.concatenate([x, x[:2] // 2]).astype(np.float64) / 255
    m2, s2 = data.dataset_stats(ds)
    assert m2[0] == pytest.approx(both.mean(), rel=1e-12) and s2[0] == pytest.approx(both.std(), rel=1e-9)


def test_model_stem_takes_the_channel_count_and_three_channels_are_unchanged():
    from model import Encoder
    torch.manual_seed(0)
    a = Encoder(3, "wrn-10-1")
    torch.manual_seed(0)
    b = Encoder(3, "wrn-10-1", in_channels=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    gray = Encoder(3, "wrn-10-1", in_channels=1)
    assert gray.backbone.stem.weight.shape[1] == 1
    z, _ = gray(torch.randn(2, 1, 16, 16))
    assert z.shape == (2, 128)


# ---------------------------------------------------------------- grayscale + x_unlabeled, end to end

def test_labels_of_images_without_one_are_never_counted():
    y = torch.tensor([0, 1, -1, 2, -1])
    pred = torch.tensor([0, 2, 1, 2, 0])
    group = torch.tensor([0, 0, 0, 1, 2])
    c = methods.pl_confusion(y, pred, group, 3)
    assert c.sum() == 3 and c[0, 0, 0] == 1 and c[0, 1, 2] == 1 and c[1, 2, 2] == 1


def test_grayscale_npz_with_unlabeled_images_and_validation_trains_end_to_end(tmp_path):
    npz = write_gray_npz(tmp_path / "g.npz")
    out = tmp_path / "run"
    res = train.main(tiny_args(npz, out, "--val-per-class", "2"))
    state, _ = evaluate.read_checkpoint(str(out))
    assert state["ema"]["backbone.stem.weight"].shape[1] == 1 and len(state["mean"]) == 1
    lb, ulb, val = (state[k].numpy() for k in ("labeled_idx", "unlabeled_idx", "val_idx"))
    assert len(lb) == 6 and len(val) == 6
    assert not set(val) & set(lb) and not set(val) & set(ulb)  # held out of both sets
    assert set(ulb) == set(range(24 + 12)) - set(val)  # the 12 images without labels included
    y = np.load(npz)["y_train"]
    assert sorted(np.bincount(y[val], minlength=3)) == [2, 2, 2]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(metrics) == 2 and all("val_acc" in m for m in metrics)
    for m in metrics:  # accuracies over the images with labels only, and the share of those
        assert 0 < m["pl_labeled_fraction"] < 1
    conf = np.load(out / "pl_confusion.npy")
    assert conf.sum() == round(metrics[-1]["pl_labeled_fraction"] * 3 * 8)
    r = json.loads((out / "result.json").read_text())
    assert r["val_acc"] == metrics[-1]["val_acc"] == res["val_acc"]
    best = max(i for i, m in enumerate(metrics) if m["val_acc"] == max(x["val_acc"] for x in metrics))
    assert r["test_acc_at_best_val"] == metrics[best]["test_acc"]
    assert r["best_val_evaluation"] == best + 1 and "flip" not in r["args"]  # on: as before
    kept, _ = evaluate.read_checkpoint(str(out / "best_val.pt"))
    assert kept["step"] == metrics[best]["step"]
    assert abs(evaluate.evaluate_checkpoint(str(out))["top1"] - r["final_acc"]) < 1e-6
    # the same split again on resume; another split is refused
    assert train.main(tiny_args(npz, out, "--val-per-class", "2"))["final_acc"] == r["final_acc"]


def test_validation_split_is_seeded_and_keeps_the_labeled_set(tmp_path):
    ds = data.load_dataset("npz:" + write_gray_npz(tmp_path / "g.npz", n_train=10))
    args = config.get_args(tiny_args("x", tmp_path / "o", "--val-per-class", "3"))
    lb0, _, _ = data.make_splits(ds, config.get_args(tiny_args("x", tmp_path / "o")))
    lb, ulb, val = data.make_splits(ds, args)
    assert np.array_equal(lb, lb0)  # validation comes from the images the labeled set leaves
    assert np.array_equal(data.make_splits(ds, args)[2], val)  # seeded
    args.seed = 1
    assert not np.array_equal(data.make_splits(ds, args)[2], val)
    args.labels_per_class = "all"
    lb_all, _, val_all = data.make_splits(ds, args)
    assert len(lb_all) == 30 - 9 and not set(lb_all) & set(val_all)
    args.seed = 0  # the same images to choose from: only the seed can change the choice
    assert not np.array_equal(data.make_splits(ds, args)[2], val_all)
    args.val_per_class = 10  # every image of a class: none would be left to label
    with pytest.raises(ValueError, match="it has 10 labeled training images and needs at least one"):
        data.make_splits(ds, args)


def test_host_resident_data_gives_bitwise_the_same_run(tmp_path):
    npz = write_gray_npz(tmp_path / "g.npz")
    runs = []
    for where in ("device", "cpu"):
        out = tmp_path / where
        train.main(tiny_args(npz, out, "--val-per-class", "1", "--data-device", where))
        runs.append((evaluate.read_checkpoint(str(out))[0], (out / "metrics.jsonl").read_text()))
    (a, ma), (b, mb) = runs
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    strip = lambda t: [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"}  # noqa: E731
                       for x in t.splitlines()]
    assert strip(ma) == strip(mb)
    # the gather moves host batches to the device; device-resident data is indexed in place
    x = torch.arange(24, dtype=torch.uint8).view(6, 1, 2, 2)
    idx = torch.tensor([4, 1, 1])
    assert torch.equal(data.gather(x, idx, torch.device("cpu")), x[idx])


def test_old_checkpoints_resume_without_the_new_keys(tiny_npz, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_npz, out, "--epochs", "1", "--eval-every", "1")
    train.main(args)
    s = torch.load(out / "last.pt", weights_only=True)
    assert not {"flip", "val_per_class", "image_size", "stl10_fold", "data_device"} & set(s["args"])
    s["args"]["flip"] = True  # an old run's explicit value reads the same as a missing one
    s.pop("val_idx"), s.pop("val_history")
    torch.save(s, out / "last.pt")
    (out / "result.json").unlink()
    train.main(args)  # finished already: resumes at its last step and writes result.json
    assert json.loads((out / "result.json").read_text())["steps"] == 3


# ---------------------------------------------------------------- bad input: one line each

@pytest.mark.parametrize("over, msg", [
    ({"x_unlabeled": np.zeros((4, 12, 12), np.uint8)}, "x_unlabeled images are 12 x 12 with 1 channel"),
    ({"x_unlabeled": np.zeros((4, 16, 16, 3), np.uint8)}, "with 3 channels but x_train"),
    ({"x_unlabeled": np.zeros((4, 16, 16), np.float32)}, "x_unlabeled must be uint8"),
    ({"x_unlabeled": np.zeros((0, 16, 16), np.uint8)}, "x_unlabeled is empty"),
    ({"x_train": np.zeros((24, 16, 16, 2), np.uint8)}, r"x_train must have shape \(N, H, W, 3\)"),
])
def test_bad_unlabeled_arrays_are_one_line_errors(tmp_path, over, msg):
    with pytest.raises(ValueError, match=msg):
        data.load_npz(write_gray_npz(tmp_path / "g.npz", **over))


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    npz = write_gray_npz(tmp_path / "g.npz")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(npz, tmp_path / "a", "--val-per-class", "7"))
    err = str(e.value.code)
    assert "--val-per-class 7 is larger than class 'c0' allows: it has 8 training images, 2 of " \
           "them labeled" in err and len(err.splitlines()) == 1
    for bad, msg in [(["--image-size", "20"], "--image-size applies to folder: datasets only"),
                     (["--stl10-fold", "1"], "--stl10-fold applies to --dataset stl10 only"),
                     (["--val-per-class", "-1"], "--val-per-class must be >= 0"),
                     (["--labels-per-class", "some"], "expected an integer or 'all'")]:
        with pytest.raises(SystemExit):
            config.get_args(drop(tiny_args(npz, tmp_path / "b"), "--labels-per-class") + bad)
        assert msg in capsys.readouterr().err


def test_flip_defaults_and_help():
    help_text = " ".join(config.make_parser().format_help().split())
    assert "--flip, --no-flip" in help_text and "off (--no-flip) for the digit sets" in help_text
    base = ["--loss", "base", "--out", "/tmp/od-unused"]
    for name, flip in [("mnist", False), ("usps", False), ("svhn", False), ("fashionmnist", True),
                       ("cifar10", True), ("npz:x.npz", True)]:
        assert config.get_args(["--dataset", name] + base).flip is flip, name
    assert config.get_args(["--dataset", "mnist", "--flip"] + base).flip is True
    assert config.get_args(["--dataset", "cifar10", "--no-flip"] + base).flip is False


# ---------------------------------------------------------------- folder:PATH

def save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path)


def make_folder(root, size=(12, 10), gray=False):
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    for split, n in (("train", 3), ("test", 2)):
        for c in ("zebra", "ant"):
            for i in range(n):
                save(f"{root}/{split}/{c}/{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    save(f"{root}/unlabeled/a/b/deep.png", rng.integers(0, 256, shape, dtype=np.uint8))
    save(f"{root}/unlabeled/top.jpg", rng.integers(0, 256, shape, dtype=np.uint8))
    (root / "unlabeled" / ".DS_Store").write_bytes(b"\0junk")  # hidden files are left out
    return root


def test_folder_dataset_reads_classes_unlabeled_and_grayscale(tmp_path):
    root = make_folder(tmp_path / "imgs")
    d = data.load_dataset(f"folder:{root}")
    assert d["classes"] == ["ant", "zebra"] and d["num_classes"] == 2  # sorted folder names
    assert d["x_train"].shape == (6, 10, 12, 3) and list(d["y_train"]) == [0, 0, 0, 1, 1, 1]
    assert d["x_test"].shape == (4, 10, 12, 3) and d["x_unlabeled"].shape == (2, 10, 12, 3)
    first = np.asarray(Image.open(root / "train" / "ant" / "0.png"))
    assert np.array_equal(d["x_train"][0], first)  # decoded pixels, unchanged
    g = data.load_dataset(f"folder:{make_folder(tmp_path / 'gray', gray=True)}", image_size=8)
    assert g["x_train"].shape == (6, 8, 8, 1)
    ref = np.asarray(Image.open(tmp_path / "gray/train/ant/0.png").resize((8, 8), Image.BILINEAR))
    assert np.array_equal(g["x_train"][0, ..., 0], ref)


def test_folder_trains_in_one_command(tmp_path):
    root = make_folder(tmp_path / "imgs", size=(8, 8))
    out = tmp_path / "run"
    args = drop(tiny_args("x", out), "--dataset", "--labels-per-class")
    train.main(["--dataset", f"folder:{root}", "--labels-per-class", "all", *args])
    state, _ = evaluate.read_checkpoint(str(out))
    assert len(state["labeled_idx"]) == 6 and len(state["unlabeled_idx"]) == 8
    assert state["classes"] == ["ant", "zebra"]


@pytest.mark.parametrize("breakage, msg", [
    (lambda r: save(f"{r}/train/ant/big.png", np.zeros((20, 20, 3), np.uint8)),
     r"images differ in size: \S+/train/ant/0.png is 12 x 10 but \S+/train/ant/big.png is 20 x 20; "
     r"pass --image-size"),
    (lambda r: open(f"{r}/train/zebra/notes.txt", "w").write("hello"),
     r"1 file\(s\) are not readable images: \S+/train/zebra/notes.txt \(UnidentifiedImageError\)"),
    (lambda r: os.makedirs(f"{r}/train/empty"), r"class folder \S+/train/empty is empty"),
    (lambda r: save(f"{r}/test/bee/0.png", np.zeros((10, 12, 3), np.uint8)),
     r"has class folder\(s\) \['bee'\] that \S+/train does not have"),
    (lambda r: open(f"{r}/unlabeled/cut.png", "wb").write(
        open(f"{r}/unlabeled/a/b/deep.png", "rb").read()[:60]), r"unlabeled/cut.png \(OSError\)"),
])
def test_folder_errors_name_the_file(tmp_path, breakage, msg):
    root = make_folder(tmp_path / "imgs")
    breakage(root)
    with pytest.raises(ValueError, match=msg):
        data.load_dataset(f"folder:{root}")


def test_deep_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    """16-bit PNG (I;16), 32-bit integer TIFF (I) and float TIFF (F) pixels: PIL's convert("L")
    clips them (a 16-bit image turns almost white); they must come out as round(v * 255 / 65535)
    and round(f * 255)."""
    root = make_folder(tmp_path / "imgs", gray=True)
    rng = np.random.default_rng(1)
    v16 = rng.integers(0, 65536, (10, 12)).astype(np.uint16)
    v32 = rng.integers(0, 65536, (10, 12)).astype(np.int32)
    k = rng.integers(0, 256, (10, 12))
    save(f"{root}/train/ant/deep16.png", v16)
    save(f"{root}/train/ant/deep32.tif", v32)
    save(f"{root}/train/ant/float.tif", (k / 255).astype(np.float32))
    assert [Image.open(f"{root}/train/ant/{f}").mode for f in ("deep16.png", "deep32.tif",
                                                                "float.tif")] == ["I;16", "I", "F"]
    d = data.load_dataset(f"folder:{root}")
    names = ["0.png", "1.png", "2.png", "deep16.png", "deep32.tif", "float.tif"]  # sorted order
    got = {n: d["x_train"][i, ..., 0] for i, n in enumerate(names)}
    as8 = lambda v: (v.astype(np.int64) * 255 + 32767) // 65535  # noqa: E731 - round half up
    assert np.array_equal(got["deep16.png"], as8(v16))
    assert np.array_equal(got["deep32.tif"], as8(v32))
    assert np.array_equal(got["float.tif"], k)
    save(f"{root}/unlabeled/odd.tif", np.full((10, 12), 3.5, np.float32))
    with pytest.raises(ValueError, match=r"odd.tif: a float image with values in 3.5..3.5; floats "
                                         r"must lie in \[0, 1\]"):
        data.load_dataset(f"folder:{root}")


def test_deep_images_holding_12_bits_get_a_warning(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", gray=True)
    save(f"{root}/train/ant/twelve.png", np.full((10, 12), 4000, np.uint16))
    data.load_dataset(f"folder:{root}")
    assert "1 image(s) of more than 8 bits use values up to only 4000" in capsys.readouterr().err
    save(f"{root}/train/ant/sixteen.png", np.full((10, 12), 4096, np.uint16))
    data.load_dataset(f"folder:{root}")
    assert "more than 8 bits" not in capsys.readouterr().err


def test_deep_grayscale_among_colour_images_is_scaled_too(tmp_path):
    root = make_folder(tmp_path / "imgs")
    v16 = np.random.default_rng(2).integers(0, 65536, (10, 12)).astype(np.uint16)
    save(f"{root}/train/zebra/deep.png", v16)
    x = data.load_dataset(f"folder:{root}")["x_train"][-1]  # zebra's last file
    assert np.array_equal(x, np.repeat(((v16.astype(np.int64) * 255 + 32767) // 65535)[..., None],
                                       3, axis=2))


# what each EXIF orientation asks a viewer to do to the stored pixels (the EXIF standard)
UPRIGHT = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path, orientation):
    """A camera JPEG stored turned or mirrored, with its EXIF orientation, is decoded as a viewer
    shows it; for 5-8 its stored 12 x 10 pixels, turned, match the folder's 10 x 12 images."""
    turned = orientation >= 5
    root = make_folder(tmp_path / "imgs", size=(10, 12) if turned else (12, 10))
    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (10, 12, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(root / "unlabeled" / "phone.jpg", exif=exif)
    stored = np.asarray(Image.open(root / "unlabeled" / "phone.jpg"))
    assert stored.shape == (10, 12, 3)
    x = data.load_dataset(f"folder:{root}")["x_unlabeled"]
    assert np.array_equal(x[0], UPRIGHT[orientation](stored))  # phone.jpg, top.jpg, a/b/deep.png


def test_exif_orientation_of_a_tiff_is_applied_once(tmp_path):
    """PIL turns a TIFF upright itself: it must not be turned (or its size swapped) again."""
    root = make_folder(tmp_path / "imgs", size=(10, 12))
    a = np.random.default_rng(4).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(root / "unlabeled" / "scan.tif", exif=exif, compression="tiff_lzw")
    x = data.load_dataset(f"folder:{root}")["x_unlabeled"]
    assert np.array_equal(x[0], np.rot90(a, -1))  # scan.tif, top.jpg, a/b/deep.png


def test_broken_exif_is_no_reason_to_refuse_an_image(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    monkeypatch.setattr(Image.Image, "getexif", lambda self: (_ for _ in ()).throw(SyntaxError()))
    assert len(data.load_dataset(f"folder:{root}")["x_unlabeled"]) == 2


def test_folder_walk_follows_links_once_and_refuses_unreadable_folders(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    extra = tmp_path / "elsewhere"
    save(f"{extra}/x.png", np.zeros((10, 12, 3), np.uint8))
    save(f"{extra}/y.png", np.zeros((10, 12, 3), np.uint8))
    os.symlink(extra, root / "unlabeled" / "linked")     # followed
    os.symlink(extra, root / "unlabeled" / "linked2")    # the same real folder: once
    os.symlink(root / "unlabeled", root / "unlabeled" / "a" / "loop")  # a loop ends
    assert len(data.load_dataset(f"folder:{root}")["x_unlabeled"]) == 2 + 2
    os.symlink(root / "train", root / "train" / "ant" / "up")  # would relabel zebra as ant
    with pytest.raises(ValueError, match=r"train/ant/up links to \S+/train, which contains "
                                         r"\S+/train/ant: its images would be read again"):
        data.load_dataset(f"folder:{root}")
    os.remove(root / "train" / "ant" / "up")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.basename(str(path)) == "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ValueError, match=r"folder \S+/unlabeled/a/b cannot be read "
                                         r"\(PermissionError\); fix its permissions"):
        data.load_dataset(f"folder:{root}")


def test_folder_refuses_images_outside_class_folders_and_unreadable_splits(tmp_path, monkeypatch,
                                                                           capsys):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "README.txt").write_text("where these came from")
    assert len(data.load_dataset(f"folder:{root}")["x_train"]) == 6
    assert "ignoring file(s) outside the class folders: README.txt" in capsys.readouterr().err
    save(f"{root}/test/stray.JPG", np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(ValueError, match=r"test holds image\(s\) outside any class folder: "
                                         r"stray.JPG; move each into \S+/test/<class>/ or delete"):
        data.load_dataset(f"folder:{root}")
    os.remove(root / "test" / "stray.JPG")
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", p)) if str(p).endswith("test") else real_listdir(p))
    with pytest.raises(ValueError, match=r"folder \S+/test cannot be read \(PermissionError\)"):
        data.load_dataset(f"folder:{root}")


@pytest.mark.parametrize("over, msg", [
    ({"x_unlabelled": np.zeros((4, 16, 16), np.uint8), "n_unl": 0},
     r"array 'x_unlabelled' is not a known name; did you mean 'x_unlabeled'\?"),
    ({"y_train": np.arange(24) % 3 - 1},
     r"y_train holds negative labels \(smallest -1\).*put images without a label in x_unlabeled"),
    ({"x_test": np.zeros((12, 16, 16, 3), np.uint8)},
     "x_test images are 16 x 16 with 3 channels but x_train images are 16 x 16 with 1 channel"),
    ({"y_test": np.arange(12) % 4, "classes": None}, "y_test has a class y_train lacks: pass classes="),
])
def test_npz_mistakes_are_named(tmp_path, over, msg):
    arrays = {k: v for k, v in over.items() if v is not None}
    path = write_gray_npz(tmp_path / "g.npz", **arrays)
    if "classes" in over:  # write it again without the class names
        f = dict(np.load(path))
        f.pop("classes")
        np.savez(path, **f)
    with pytest.raises(ValueError, match=msg):
        data.load_npz(path)


def test_npz_unrelated_array_warns_and_tilde_expands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_gray_npz(tmp_path / "g.npz", filenames=np.array(["a"] * 24))
    d = data.load_dataset("npz:~/g.npz")
    assert len(d["x_train"]) == 24 and "array 'filenames' is not used" in capsys.readouterr().err


def test_short_class_is_named_by_its_folder(tmp_path):
    root = make_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    args = drop(tiny_args("x", out), "--dataset", "--labels-per-class")
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", f"folder:{root}", "--labels-per-class", "4", *args])
    assert "class 0 ('ant') has 3 training images, fewer than the 4 labels per class" \
        in str(e.value.code)


def test_resume_on_changed_data_is_refused_and_evaluate_checks_channels(tmp_path, capsys):
    npz, out = write_gray_npz(tmp_path / "g.npz"), tmp_path / "run"
    args = tiny_args(npz, out, "--epochs", "1")
    train.main(args)
    s = torch.load(out / "last.pt", weights_only=True)
    assert s["data"]["sizes"] == {"train": 24, "test": 12, "unlabeled": 12}
    (out / "result.json").unlink()
    f = dict(np.load(npz))
    f["x_test"] = f["x_test"].copy()
    f["x_test"][0, 0, 0] ^= 1  # one pixel of one test image
    np.savez(npz, **f)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert "the dataset's test images or labels are not the ones this run was trained on" \
        in str(e.value.code) and not (out / "result.json").exists()
    query.main([str(out), "--n", "2", "--strategy", "entropy", "--device", "cpu",
                "--out", str(tmp_path / "r1.txt")])  # the training images are the run's
    evaluate.evaluate_checkpoint(str(out))  # other test images: evaluated, with a warning
    assert "its test images or labels are not the ones the run in" in capsys.readouterr().err
    f["x_train"] = f["x_train"].copy()
    f["x_train"][3, 1, 1] ^= 1
    np.savez(npz, **f)
    with pytest.raises(SystemExit) as e:
        query.main([str(out), "--n", "2", "--strategy", "entropy", "--device", "cpu",
                    "--out", str(tmp_path / "r2.txt")])
    assert "its train images or labels are not the ones the run in" in str(e.value.code)
    f["x_test"] = np.concatenate([f["x_test"], f["x_test"][:1]])
    f["y_test"] = np.concatenate([f["y_test"], f["y_test"][:1]])
    np.savez(npz, **f)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert "'test': 12" in str(e.value.code) and "'test': 13" in str(e.value.code)
    colour = write_gray_npz(tmp_path / "c.npz", x_train=np.zeros((24, 16, 16, 3), np.uint8),
                            x_test=np.zeros((12, 16, 16, 3), np.uint8), n_unl=0)
    with pytest.raises(ValueError, match="has 3-channel images but the run in .* was trained on "
                                         "1-channel ones"):
        evaluate.evaluate_checkpoint(str(out), dataset=f"npz:{colour}")


def test_table_writes_flags_as_the_command_line_does():
    import report
    assert report.differing({"flip": False}, [{}], protocol=False) == "--no-flip"
    assert report.differing({}, [{"flip": False}], protocol=False) == "--flip"
    assert report.differing({}, [{"val_per_class": 2}], protocol=False) == "--val-per-class 0"
    assert report.differing({}, [{"image_size": 32}], protocol=False) == "--image-size (default)"


# ---------------------------------------------------------------- built-in datasets from files

def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashionmnist_from_an_idx_folder_is_single_channel(tmp_path):
    rng = np.random.default_rng(0)
    for key, stem in data.IDX_FILES.items():
        n = 30 if "train" in key else 10
        arr = rng.integers(0, 256, (n, 28, 28)) if key.startswith("x") else np.arange(n) % 10
        write_idx(tmp_path / f"{stem}.gz", arr)
    d = data.load_dataset("fashionmnist", str(tmp_path))
    assert d["x_train"].shape == (30, 28, 28, 1) and d["classes"][0] == "T-shirt/top"
    sub = data.make_subset(d, 2, 1, 0)
    assert sub["x_train"].shape == (20, 28, 28, 1)


def test_stl10_binary_files_fold_and_orientation(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    imgs = {k: rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
            for k, n in (("x_train", 20), ("x_test", 10), ("x_unlabeled", 5))}
    for key, fname in data.STL10_FILES.items():
        if key.startswith("x"):  # STL-10 stores each channel column-major: (N, C, W, H)
            imgs[key].transpose(0, 3, 2, 1).tofile(folder / fname)
        else:
            (np.arange(20 if "train" in key else 10) % 10 + 1).astype(np.uint8).tofile(folder / fname)
    (folder / "fold_indices.txt").write_text("0 3 5\n1 2 19\n")
    d = data.load_dataset("stl10", str(tmp_path))
    for k, x in imgs.items():
        assert np.array_equal(d[k], x), k
    assert d["y_train"][:3].tolist() == [0, 1, 2]
    args = config.get_args(["--dataset", "stl10", "--stl10-fold", "1", "--loss", "base",
                            "--out", str(tmp_path / "o")])
    lb, ulb, _ = data.make_splits(d, args)
    assert lb.tolist() == [1, 2, 19] and len(ulb) == 25


def test_svhn_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    for fname, n in (("train_32x32.mat", 12), ("test_32x32.mat", 6)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        scipy_io.savemat(tmp_path / fname, {"X": x, "y": (np.arange(n) % 10 + 1)[:, None]})
    d = data.load_dataset("svhn", str(tmp_path))
    assert d["x_train"].shape == (12, 32, 32, 3) and d["y_train"][9] == 0  # label 10 is digit 0
    (tmp_path / "test_32x32.mat").write_bytes(b"junk")
    with pytest.raises(ValueError, match="test_32x32.mat: not a readable SVHN file"):
        data.load_dataset("svhn", str(tmp_path))


def test_offline_builtin_is_one_line(tmp_path, monkeypatch):
    import torchvision

    def no_network(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.datasets.STL10, "__init__", no_network)
    with pytest.raises(RuntimeError, match="stl10 is not in .* could not be downloaded .* extract it"):
        data.load_dataset("stl10", str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------- the tables

def write_result(folder, final, a, at_best=None):
    os.makedirs(folder)
    r = {"final_acc": final, "args": a, **({} if at_best is None else {"test_acc_at_best_val": at_best})}
    (folder / "result.json").write_text(json.dumps(r))


def test_table_reports_final_or_test_at_best_validation(tmp_path):
    import report
    a = {"dataset": "npz:x.npz", "labels_per_class": 4, "loss": "base"}
    new = {"flip": True, "val_per_class": 0, "data_device": "cpu"}
    write_result(tmp_path / "old" / "s0", 0.5, {**a, "seed": 0})  # from before these flags
    write_result(tmp_path / "old" / "s1", 0.7, {**a, **new, "seed": 1})
    assert "60.00 ± 14.14 (2 seeds)" in report.table1(str(tmp_path / "old"))  # one experiment
    val = {**a, **new, "val_per_class": 5}
    write_result(tmp_path / "val" / "s0", 0.3, {**val, "seed": 0}, at_best=0.4)
    write_result(tmp_path / "val" / "s1", 0.5, {**val, "seed": 1}, at_best=0.6)
    assert "40.00 ± 14.14 (2 seeds)" in report.table1(str(tmp_path / "val"))
    best = report.table1(str(tmp_path / "val"), "at-best-val")
    assert "50.00 ± 14.14 (2 seeds)" in best and "the best validation accuracy" in best
