"""The prepared check (python bench.py --check) in its reduced CPU form: every check runs and
passes, the JSON and the summary hold what docs/speed.md promises, and a broken path fails the
check that names it, in one line, with exit status 1."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import gpu_check

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ["equivalence", "augmentation", "speed", "resume", "torchrun"]


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("check") / "check.json"
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--check", "--device",
                        "cpu", "--no-compile", "--json", str(out)], capture_output=True, text=True,
                       cwd=HERE, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return p, json.loads(out.read_text()), out.with_suffix(".txt").read_text()


def test_the_cpu_form_runs_every_check_and_passes(cpu_check):
    p, r, summary = cpu_check
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert r["form"] == "cpu" and r["passed"] and list(r["checks"]) == CHECKS
    assert all(c["ok"] is True for c in r["checks"].values())
    assert "all checks passed" in summary and summary.count("\n  pass ") == len(CHECKS)
    eq = r["checks"]["equivalence"]["methods"]
    assert set(eq) == set(gpu_check.METHODS)
    for m in eq.values():
        assert {"cpu_fp32", "fp32", "amp"} <= set(m) and m["fp32"]["grad_norm"] > 0
        assert m["relative_errors"]["fp32 loss vs CPU"] == 0  # CPU vs CPU: the same arithmetic
        assert 0 < m["relative_errors"]["amp loss vs fp32"] <= gpu_check.TOL["amp_loss"]  # bf16 ran
    rows = r["checks"]["speed"]["rows"]
    assert [x["method"] for x in rows] == gpu_check.METHODS
    for x in rows:
        assert x["gap_to_target"] == pytest.approx(73.0 / x["steps_s"])
    assert r["checks"]["resume"]["bitwise"] and r["checks"]["torchrun"]["processes"] == 1


def test_a_broken_path_fails_its_check_in_one_line(tmp_path, monkeypatch, capsys):
    real_flip, real_check = data.flip_translate, gpu_check.check_augmentation

    def broken_augmentation(c, dev):  # the second ("device") flip + translate one pixel off
        calls = []

        def flip(x, f, dy, dx):
            calls.append(1)
            return real_flip(x, f, dy + (len(calls) > 1), dx)
        monkeypatch.setattr(data, "flip_translate", flip)
        try:
            return real_check(c, dev)
        finally:
            monkeypatch.setattr(data, "flip_translate", real_flip)

    real_make_run = gpu_check.make_run

    def wrong_temperature(argv):  # the "device" run with another contrastive temperature
        return real_make_run(argv + ["--temp", "0.2"] if "eq_entropy_fp32" in " ".join(argv)
                             else argv)

    monkeypatch.setattr(gpu_check, "check_augmentation", broken_augmentation)
    monkeypatch.setattr(gpu_check, "make_run", wrong_temperature)
    monkeypatch.setattr(gpu_check, "METHODS", ["entropy"])
    torch.set_num_threads(1)
    rc = gpu_check.main(["--device", "cpu", "--no-compile", "--skip", "speed resume torchrun",
                         "--json", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert rc == 1
    failed = [line for line in out.splitlines() if line.startswith("FAILED: ")]
    assert len(failed) == 2
    assert failed[0].startswith("FAILED: equivalence: entropy: fp32 loss vs CPU differs by")
    assert failed[1] == "FAILED: augmentation: differ on the device: flip + translate"
    r = json.loads((tmp_path / "c.json").read_text())
    assert not r["passed"] and r["checks"]["speed"]["ok"] is None  # skipped, not failed
