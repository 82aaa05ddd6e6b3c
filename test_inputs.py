"""Bad input and data safety (issue 10): the cases that used to crash, lose a backup or mislead.
Each test failed on the code before the fix."""
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import data
import evaluate
import report
import train
from conftest import tiny_args, write_tiny_npz

HERE = os.path.dirname(os.path.abspath(__file__))


def one_line_exit(call) -> str:
    with pytest.raises(SystemExit) as e:
        call()
    msg = str(e.value.code)
    assert "\n" not in msg and "Traceback" not in msg and "\x1b" not in msg, msg
    return msg


# ---------------------------------------------------------------- data safety

def test_fallback_from_a_corrupt_last_pt_keeps_the_good_backup(tiny_npz, tmp_path):
    out = tmp_path / "r"
    train.main(tiny_args(tiny_npz, out, "--save-every", "1"))
    (out / "result.json").unlink()
    (out / "last.pt").write_bytes(b"torn")  # step 6 lost; prev.pt holds step 5
    train.main(tiny_args(tiny_npz, out, "--save-every", "1"))  # 1 step, then 1 save
    assert (out / "last.pt.corrupt").read_bytes() == b"torn"
    assert torch.load(out / "prev.pt", weights_only=True)["step"] == 5  # not the torn file
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 6


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:603] . "
                                                "unexpected pos 1088 vs 1024"),
                                   OSError(28, "No space left on device")])
def test_any_failure_while_writing_a_checkpoint_is_one_line_and_resumable(tiny_npz, tmp_path,
                                                                          monkeypatch, error):
    out = tmp_path / "r"
    rewind(tiny_npz, out)  # a good checkpoint at step 5 of 6
    real = torch.save

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise error
    monkeypatch.setattr(torch, "save", full)
    msg = one_line_exit(lambda: train.main(tiny_args(tiny_npz, out, "--save-every", "1")))
    assert "could not write checkpoint" in msg and "previous checkpoint" in msg and "is kept" in msg
    assert not (out / "last.pt.tmp").exists()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 5
    monkeypatch.setattr(torch, "save", real)
    assert train.main(tiny_args(tiny_npz, out, "--save-every", "1"))["steps"] == 6  # resumes


def rewind(npz, out):
    """A finished tiny run (6 steps) set back to its checkpoint at step 5, as if interrupted."""
    train.main(tiny_args(npz, out, "--save-every", "1"))
    os.replace(out / "prev.pt", out / "last.pt")
    (out / "result.json").unlink()


def test_a_torn_last_metrics_line_is_dropped_on_resume(tiny_npz, tmp_path):
    out = tmp_path / "r"
    rewind(tiny_npz, out)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "epoch": 2.0, "lo')  # a crash in the middle of an append
    train.main(tiny_args(tiny_npz, out, "--save-every", "1"))
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [3, 6]


def test_no_temporary_files_are_left_behind(tiny_npz, tmp_path):
    out = tmp_path / "results" / "r"
    train.main(tiny_args(tiny_npz, out))
    evaluate.main(["--table", str(tmp_path / "results")])
    left = [p.name for p in (tmp_path / "results").rglob("*") if "tmp" in p.name]
    assert left == [] and (tmp_path / "results" / "table1.md").exists()


# ---------------------------------------------------------------- bad datasets

def npz_cases(d):
    good = write_tiny_npz(d / "good.npz")
    np.save(d / "array.npy", np.zeros(3))
    (d / "text.npz").write_text("x_train,y_train\n1,2\n")
    (d / "folder.npz").mkdir()
    raw = bytearray((d / "good.npz").read_bytes())
    info = zipfile.ZipFile(good).getinfo("x_train.npy")
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 500] ^= 0xFF
    (d / "crc.npz").write_bytes(bytes(raw))
    f = dict(np.load(good))
    np.savez(d / "objclasses.npz", **dict(f, classes=np.array(["a", 1, None], dtype=object)))
    tiny = np.zeros((6, 4, 4, 3), np.uint8)
    np.savez(d / "small.npz", x_train=tiny, y_train=np.arange(6) % 2, x_test=tiny, y_test=np.arange(6) % 2)
    empty = np.zeros((6, 0, 0, 3), np.uint8)
    np.savez(d / "zero.npz", x_train=empty, y_train=np.arange(6) % 2, x_test=empty, y_test=np.arange(6) % 2)
    np.savez(d / "oneclass.npz", **dict(f, y_train=np.zeros_like(f["y_train"]),
                                        y_test=np.zeros_like(f["y_test"]), classes=np.array(["only"])))
    return {"array.npy": "single .npy array", "text.npz": "not an .npz archive",
            "folder.npz": "is a directory", "crc.npz": "'x_train' is corrupt",
            "objclasses.npz": "'classes' cannot be read without pickle",
            "small.npz": "at least 5 x 5", "zero.npz": "at least 5 x 5",
            "oneclass.npz": "single class"}


def test_bad_npz_files_are_one_line_errors_before_training(tmp_path):
    for name, expected in npz_cases(tmp_path).items():
        for loss in ("base", "fixmatch"):
            args = [a for a in tiny_args(tmp_path / name, tmp_path / f"out_{name}_{loss}",
                                         "--loss", loss) if a not in ("--entropy-ratio", "0.5")]
            msg = one_line_exit(lambda: train.main(args))
            assert expected in msg and name in msg, (name, msg)
            assert not (tmp_path / f"out_{name}_{loss}").exists()  # nothing left behind


def test_smallest_allowed_images_train(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, data.MIN_SIZE, data.MIN_SIZE, 3), dtype=np.uint8)
    np.savez(tmp_path / "five.npz", x_train=x, y_train=np.arange(12) % 2, x_test=x, y_test=np.arange(12) % 2)
    res = train.main(tiny_args(tmp_path / "five.npz", tmp_path / "r"))
    assert res["steps"] == 6


def test_failed_download_leaves_no_data_dir(tmp_path, monkeypatch):
    import torchvision

    class Offline:
        def __init__(self, root, train=True, download=False):
            os.makedirs(root, exist_ok=True)
            open(os.path.join(root, "cifar-10-python.tar.gz.part"), "w").close()
            raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    ddir, out = tmp_path / "data", tmp_path / "runs" / "out"
    msg = one_line_exit(lambda: train.main(["--dataset", "cifar10", "--data-dir", str(ddir),
                                            "--out", str(out), "--device", "cpu"]))
    assert "could not be downloaded" in msg
    assert not ddir.exists() and not (tmp_path / "runs").exists()  # nor the parent it made
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "other.txt").write_text("x")
    one_line_exit(lambda: train.main(["--dataset", "cifar10", "--data-dir", str(ddir), "--out",
                                      str(tmp_path / "keep" / "out"), "--device", "cpu"]))
    assert (tmp_path / "keep" / "other.txt").exists() and not (tmp_path / "keep" / "out").exists()


# ---------------------------------------------------------------- bad flags

@pytest.mark.parametrize("bad, flag", [(["--wd", "nan"], "--wd"), (["--wd", "inf"], "--wd"),
                                       (["--seed", "-1"], "--seed"),
                                       (["--eval-every", "3"], "--eval-every")])
def test_more_bad_flags_name_the_flag(tiny_npz, tmp_path, capsys, bad, flag):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_npz, tmp_path / "r", *bad))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and "error:" in err
    assert not (tmp_path / "r").exists()


def test_nonfinite_before_any_checkpoint_says_so(tiny_npz, tmp_path):
    msg = one_line_exit(lambda: train.main(tiny_args(tiny_npz, tmp_path / "r",
                                                      "--debug-nan-step", "0")))
    assert "no checkpoint had been written yet" in msg and "is kept" not in msg


def test_both_checkpoints_corrupt_is_one_short_line(tiny_npz, tmp_path):
    out = tmp_path / "r"
    train.main(tiny_args(tiny_npz, out, "--save-every", "1"))
    (out / "last.pt").write_bytes(b"\x1b[31mgarbage")
    (out / "prev.pt").write_bytes(os.urandom(300))
    msg = one_line_exit(lambda: train.main(tiny_args(tiny_npz, out)))
    assert "last.pt" in msg and "prev.pt" in msg and len(msg) < 400
    assert "pickle" not in msg.lower() and "zip" not in msg.lower()


def test_help_has_no_default_none_and_result_json_no_hidden_flag(tiny_npz, tmp_path):
    help_text = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True,
                               text=True, cwd=HERE).stdout
    assert "(default: None)" not in help_text and "debug" not in help_text
    ev = subprocess.run([sys.executable, "evaluate.py", "--help"], capture_output=True, text=True,
                        cwd=HERE).stdout
    assert re.search(r"--device DEVICE\s+device to evaluate on", ev)
    out = tmp_path / "r"
    train.main(tiny_args(tiny_npz, out))
    res = json.loads((out / "result.json").read_text())
    assert "debug_nan_step" not in res["args"] and "out_created" not in res["args"]


# ---------------------------------------------------------------- evaluate.py

def fake_result(d, acc, **args):
    d.mkdir(parents=True)
    base = dict(report.PROTOCOL, dataset="cifar10", labels_per_class=4, loss="base", seed=0)
    (d / "result.json").write_text(json.dumps({"final_acc": acc, "args": dict(base, **args)}))


def test_table_separates_configurations_and_skips_broken_files(tmp_path, capsys):
    r = tmp_path / "res"
    fake_result(r / "a", 0.90, seed=0)
    fake_result(r / "b", 0.92, seed=1, labeled_idx=None)  # a flag added later, left at None
    fake_result(r / "c", 0.50, seed=0, mu=2)  # another experiment, not a third seed
    fake_result(r / "d", 0.40, seed=0, dataset="npz:mine.npz")
    (r / "broken").mkdir()
    (r / "broken" / "result.json").write_text('{"final_acc": 0.9, "ar')
    (r / "incomplete").mkdir()
    (r / "incomplete" / "result.json").write_text('{"final_acc": 0.9}')
    evaluate.main(["--table", str(r)])
    captured = capsys.readouterr()
    md = (r / "table1.md").read_text()
    cifar_row = [l for l in md.splitlines() if l.startswith("| CIFAR-10 | 4 |")][0]
    assert "91.00 ± 1.41 (2 seeds)" in cifar_row
    assert re.search(r"\| cifar10 \| 4 \| base \| --mu 2 \| 50.00 \(1 seed\) \|", md)
    assert re.search(r"\| npz:mine.npz \| 4 \| base \| .* \| 40.00 \(1 seed\) \|", md)
    assert "broken" in captured.err and "incomplete" in captured.err and "skipping" in captured.err


def test_evaluate_from_another_directory_and_a_moved_dataset(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    write_tiny_npz(work / "tiny.npz")
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"),
                        *tiny_args("tiny.npz", "run")], capture_output=True, text=True, cwd=work)
    assert p.returncode == 0, p.stderr
    elsewhere = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"),
                                str(work / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "on the 30 test images of npz:" in elsewhere.stdout
    os.rename(work / "tiny.npz", tmp_path / "moved.npz")
    lost = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), str(work / "run")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert lost.returncode != 0 and "does not exist" in lost.stderr and "Traceback" not in lost.stderr
    found = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), str(work / "run"),
                            "--dataset", f"npz:{tmp_path / 'moved.npz'}"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert found.returncode == 0 and "top-1 accuracy" in found.stdout


def test_evaluate_with_a_dataset_that_no_longer_matches(tiny_npz, tmp_path):
    out = tmp_path / "r"
    train.main(tiny_args(tiny_npz, out))
    write_tiny_npz(tmp_path / "five.npz", k=5)
    p = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), str(out), "--dataset",
                        f"npz:{tmp_path / 'five.npz'}"], capture_output=True, text=True, cwd=HERE)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "has 5 classes but the run" in p.stderr and "trained on 3" in p.stderr
