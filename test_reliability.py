"""Interruptions and failures: exact resume after SIGKILL, atomic and safe checkpoints,
non-finite losses, configuration mismatches, a full disk."""
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

import evaluate
import train
from conftest import tiny_args

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_cli(args, kill_after_step=None):
    """train.py in a subprocess; with kill_after_step, SIGKILL it once that step is logged."""
    cmd = [sys.executable, os.path.join(HERE, "train.py"), *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                         cwd=HERE)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if kill_after_step is not None and line.startswith(f"step {kill_after_step}/"):
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    return p.returncode, "".join(lines)


def final_state(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)


def assert_same_state(a, b):
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["history"] == b["history"] and a["step"] == b["step"]


def test_kill_and_resume_gives_the_uninterrupted_result(tiny_npz, tmp_path):
    extra = ["--epochs", "3", "--steps-per-epoch", "4", "--save-every", "1"]
    ref_out = tmp_path / "ref"
    rc, log = run_cli(tiny_args(tiny_npz, ref_out, *extra))
    assert rc == 0, log
    ref = final_state(ref_out)
    kill_points = random.Random(0).sample(range(2, 12), 3)
    for k in kill_points:
        out = tmp_path / f"killed_{k}"
        rc, log = run_cli(tiny_args(tiny_npz, out, *extra), kill_after_step=k)
        assert rc == -signal.SIGKILL, log
        assert not (out / "result.json").exists()
        rc, log = run_cli(tiny_args(tiny_npz, out, *extra))
        assert rc == 0 and "resumed from" in log, log
        assert_same_state(ref, final_state(out))
        with open(out / "metrics.jsonl") as fh, open(ref_out / "metrics.jsonl") as fr:
            steps = [l.split(",")[0] for l in fh]
            assert steps == [l.split(",")[0] for l in fr]  # no duplicated or missing epochs


def test_truncated_checkpoint_falls_back_to_the_previous_one(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_npz, out, "--save-every", "1"))
    prev_step = torch.load(out / "prev.pt", weights_only=True)["step"]
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    state, f = evaluate.read_checkpoint(str(out))
    assert f.endswith("prev.pt") and state["step"] == prev_step
    assert "last.pt is unreadable" in capsys.readouterr().err
    (out / "result.json").unlink()
    res = train.main(tiny_args(tiny_npz, out, "--save-every", "1"))  # resumes from prev.pt
    assert res["steps"] == 6
    # both unreadable: a clear error that names the files, no training over them
    for n in ("last.pt", "prev.pt"):
        (out / n).write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_npz, out))
    assert "last.pt" in str(e.value.code) and "prev.pt" in str(e.value.code)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_with_a_pickled_object_is_rejected(tiny_npz, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"step": 1, "evil": Payload()}, out / "last.pt")
    with pytest.raises(evaluate.CheckpointError, match="last.pt"):
        evaluate.read_checkpoint(str(out))
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_npz, out))
    assert "last.pt" in str(e.value.code)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_npz, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_npz, out, "--save-every", "1", "--debug-nan-step", "3"))
    msg = str(e.value.code)
    assert "non-finite loss at step 4" in msg and "loss = nan" in msg
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "result.json").exists()


def test_skip_nonfinite_skips_and_finishes(tiny_npz, tmp_path, capsys):
    out = tmp_path / "skip"
    res = train.main(tiny_args(tiny_npz, out, "--debug-nan-step", "2", "--skip-nonfinite", "1"))
    assert res["steps"] == 6
    assert "step 3: non-finite loss nan, step skipped (1 of at most 1)" in capsys.readouterr().out
    state = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resuming_with_another_configuration_is_refused(tiny_npz, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_npz, out))
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_npz, out, "--seed", "1", "--arch", "wrn-16-1"))
    msg = str(e.value.code)
    assert "different configuration" in msg and "seed: checkpoint 0, now 1" in msg
    assert "arch: checkpoint 'wrn-10-1', now 'wrn-16-1'" in msg


def test_full_disk_at_save_time_is_a_clear_error(tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_npz, out))
    good = torch.load(out / "last.pt", weights_only=True)["step"]
    (out / "result.json").unlink()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_npz, tmp_path / "other"))
    assert "No space left on device" in str(e.value.code) and "could not write checkpoint" in str(e.value.code)
    assert not (tmp_path / "other" / "last.pt.tmp").exists()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == good
