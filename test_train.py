"""train.py / evaluate.py / run_all.sh end to end on a tiny synthetic dataset (CPU, seconds)."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

import config
import evaluate
import report
import train
from conftest import tiny_args

HERE = os.path.dirname(os.path.abspath(__file__))


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(l) for l in fh if l.strip()]


@pytest.mark.parametrize("loss", ["entropy", "base"])
def test_end_to_end_run_writes_metrics_checkpoint_and_result(tiny_npz, tmp_path, loss):
    out = tmp_path / "run"
    res = train.main(tiny_args(tiny_npz, out, "--loss", loss) if loss == "entropy" else
                     [a for a in tiny_args(tiny_npz, out, "--loss", loss)
                      if a not in ("--entropy-ratio", "0.5")])
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [3, 6]
    for key in ("lr", "loss", "test_acc", "confident", "entropy_selected", "unconfident",
                "pl_acc_confident", "pl_acc_selected", "mean_weight"):
        assert key in metrics[0]
    n_ulb = 3 * 8  # steps per epoch x mu B
    for m in metrics:  # properties a wrong counter would break (pl_confusion is checked too)
        for group in ("confident", "entropy_selected", "unconfident"):
            assert (m[group] * n_ulb) == pytest.approx(round(m[group] * n_ulb))  # whole samples
        assert (m["pl_acc_confident"] is None) == (m["confident"] == 0)
        assert (m["pl_acc_selected"] is None) == (m["entropy_selected"] == 0)
        assert 0.2 - 1e-6 <= m["mean_weight"] <= 1 + 1e-6  # lambda <= every weight <= 1
        if loss == "base":
            assert m["entropy_selected"] == 0
            expected = m["confident"] + 0.2 * m["unconfident"]  # weights 1 and lambda only
            assert m["mean_weight"] == pytest.approx(expected)
    assert any(m["entropy_selected"] > 0 for m in metrics) == (loss == "entropy")
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 6 and result["evaluations"] == 2
    assert result["final_acc"] == metrics[-1]["test_acc"] == res["final_acc"]
    assert result["best_acc"] == max(m["test_acc"] for m in metrics)
    for key in ("median_last20_acc", "wall_time_s", "versions", "device", "args"):
        assert key in result
    state, f = evaluate.read_checkpoint(str(out))
    assert f.endswith("last.pt") and state["step"] == 6
    assert len(state["labeled_idx"]) == 6  # 2 per class, saved with the run
    # evaluate.py reads what train.py wrote and agrees with it
    r = evaluate.evaluate_checkpoint(str(out), per_class=True)
    assert abs(r["top1"] - result["final_acc"]) < 1e-6 and set(r["per_class"]) == {"c0", "c1", "c2"}


def test_running_again_resumes_instead_of_restarting(tiny_npz, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny_args(tiny_npz, out))
    before = (out / "metrics.jsonl").read_text()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    capsys.readouterr()
    train.main(tiny_args(tiny_npz, out))
    assert "resumed from" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before  # no step was trained again
    again = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], again["model"][k]) for k in ckpt["model"])


def test_unlabeled_stream_covers_the_whole_training_set_labeled_images_included(tiny_npz, tmp_path,
                                                                               monkeypatch):
    """The unlabeled set is the whole training set (FixMatch, [G]): the images the step draws as
    unlabeled, over one pass, are every training index exactly once."""
    run = train.Run(config.get_args(tiny_args(tiny_npz, tmp_path / "r")))
    seen = []
    real = run.sampler_ulb.next
    monkeypatch.setattr(run.sampler_ulb, "next", lambda: seen.append(real()) or seen[-1])
    n = len(run.x_train)
    for _ in range(-(-n // 8)):  # mu * B = 8 per step
        run.batch()
    first_pass = torch.cat(seen)[:n].tolist()
    assert sorted(first_pass) == list(range(n))
    assert set(run.labeled_idx.tolist()) <= set(first_pass) and len(run.labeled_idx) == 6


def test_labeled_only_control(tiny_npz, tmp_path):
    out = tmp_path / "mu0"
    res = train.main(tiny_args(tiny_npz, out, "--mu", "0"))
    m = read_jsonl(out / "metrics.jsonl")[-1]
    assert res["steps"] == 6 and m["mean_weight"] is None and m["confident"] == 0


def test_learns_on_a_separable_toy_problem(tiny_npz, tmp_path):
    """Mean colour decides the class: 60 steps must beat chance (1/3) clearly."""
    out = tmp_path / "learn"
    args = tiny_args(tiny_npz, out, "--epochs", "4", "--steps-per-epoch", "15", "--log-every", "100",
                     "--lr", "0.05")
    res = train.main(args)
    assert res["best_acc"] > 0.6


def test_evaluate_cli_and_table(tiny_npz, tmp_path):
    out = tmp_path / "results" / "tiny_2_entropy_s0"
    train.main(tiny_args(tiny_npz, out))
    p = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), str(out), "--per-class"],
                       capture_output=True, text=True, cwd=HERE)
    assert p.returncode == 0, p.stderr
    assert "top-1 accuracy" in p.stdout and "c2" in p.stdout
    # a CIFAR-looking result.json to fill one Table 1 cell; the rest must say "not run"
    fake = tmp_path / "results" / "cifar10_4_base_s0"
    fake.mkdir()
    cell = dict(report.PROTOCOL, dataset="cifar10", labels_per_class=4, loss="base")
    (fake / "result.json").write_text(json.dumps({"final_acc": 0.9, "args": dict(cell, seed=0)}))
    fake2 = tmp_path / "results" / "cifar10_4_base_s1"
    fake2.mkdir()
    (fake2 / "result.json").write_text(json.dumps({"final_acc": 0.92, "args": dict(cell, seed=1)}))
    evaluate.main(["--table", str(tmp_path / "results")])
    md = (tmp_path / "results" / "table1.md").read_text()
    row = [l for l in md.splitlines() if l.startswith("| CIFAR-10 | 4 |")][0]
    assert "91.00 ± 1.41 (2 seeds)" in row and "94.41" in row and "94.59" in row
    assert md.count("not run") == 7


def test_evaluate_missing_checkpoint_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), str(tmp_path)],
                       capture_output=True, text=True, cwd=HERE)
    assert p.returncode != 0 and "no checkpoint found" in p.stderr and "Traceback" not in p.stderr


def test_run_all_dry_run_lists_the_8_cells(tmp_path):
    env = dict(os.environ, DRY_RUN="1", SEEDS="0", OUT_DIR=str(tmp_path), EPOCHS="3",
               EXTRA_ARGS="--compile", PYTHON=sys.executable)
    p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0, p.stderr
    cmds = p.stdout.strip().splitlines()
    assert len(cmds) == 9 and shlex.split(cmds[-1])[1:] == [os.path.join(HERE, "evaluate.py"),
                                                            "--table", str(tmp_path)]
    cells = set()
    for c in cmds[:-1]:
        a = shlex.split(c)
        assert a[1] == os.path.join(HERE, "train.py") and "--compile" in a and a[a.index("--epochs") + 1] == "3"
        cells.add((a[a.index("--dataset") + 1], a[a.index("--labels-per-class") + 1],
                   a[a.index("--loss") + 1]))
        assert a[a.index("--out") + 1].startswith(str(tmp_path))
    assert cells == {(d, n, l) for d in ("cifar10", "cifar100") for n in ("4", "25")
                     for l in ("base", "entropy")}
    env["SEEDS"] = "0 1"
    p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True,
                       env=env)
    assert len(p.stdout.strip().splitlines()) == 17


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: train.py writes a result.json at the paper protocol, the rest is real
if [ "${1##*/}" = train.py ]; then
  shift
  while [ $# -gt 0 ]; do
    case $1 in --out) out=$2;; --dataset) ds=$2;; --labels-per-class) n=$2;; --loss) loss=$2;;
               --seed) seed=$2;; esac
    shift
  done
  mkdir -p "$out"
  echo "{\\"final_acc\\": 0.5, \\"args\\": {\\"dataset\\": \\"$ds\\", \\"labels_per_class\\": $n, \\"loss\\": \\"$loss\\", \\"seed\\": $seed, PROTOCOL}}" > "$out/result.json"
else
  exec "$REAL_PYTHON" "$@"
fi
"""


def test_run_all_with_a_space_in_out_dir_and_methods(tmp_path):
    fake = tmp_path / "fake python"
    protocol = json.dumps(report.PROTOCOL)[1:-1]
    fake.write_text(FAKE_PYTHON.replace("PROTOCOL", protocol.replace('"', '\\"')))
    fake.chmod(0o755)
    out = tmp_path / "my results"
    env = dict(os.environ, SEEDS="0 1", OUT_DIR=str(out), PYTHON=str(fake),
               REAL_PYTHON=sys.executable, METHODS="fixmatch entropy")
    p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr + p.stdout
    assert len(list(out.glob("*/result.json"))) == 16
    md = (out / "table1.md").read_text()
    assert "50.00 ± 0.00 (2 seeds)" in md and "| fixmatch | 50.00 ± 0.00 (2 seeds) / 86.19" in md
    p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert p.stdout.count("skip (finished)") == 16


@pytest.mark.parametrize("bad", [
    ["--dataset", "imagenet"],
    ["--labels-per-class", "0"],
    ["--batch-size", "-1"],
    ["--epochs", "0"],
    ["--steps-per-epoch", "0"],
    ["--mu", "-1"],
    ["--lr", "0"],
    ["--lr", "nan"],
    ["--threshold", "1.5"],
    ["--low-weight", "0"],
    ["--low-weight", "2"],
    ["--entropy-ratio", "0"],
    ["--entropy-ratio", "1.5"],
    ["--entropy-epochs", "99"],
    ["--ema-decay", "1"],
    ["--wd", "-1"],
    ["--temp", "0"],
    ["--pl-temp", "-0.1"],
    ["--arch", "resnet"],
    ["--arch", "wrn-11-2"],
    ["--loss", "focal"],
    ["--entropy-weighting", "cubic"],
    ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"],
    ["--device", "tpu"],
    ["--save-every", "-5"],
    ["--labels-per-class", "x"],
])
def test_invalid_arguments_are_argparse_errors(tiny_npz, tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_npz, tmp_path / "bad", *bad))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def test_beta_required_without_a_paper_default(tiny_npz, tmp_path, capsys):
    args = [a for a in tiny_args(tiny_npz, tmp_path / "b") if a not in ("--entropy-ratio", "0.5")]
    with pytest.raises(SystemExit):
        train.main(args)
    assert "--entropy-ratio is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(args + ["--loss", "base", "--entropy-ratio", "0.3"])
    assert "entropy only" in capsys.readouterr().err


def test_unwritable_output_and_bad_data_are_one_line_errors(tiny_npz, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        train.main(tiny_args(tiny_npz, blocker / "sub"))
    assert "not writable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(tiny_npz, tmp_path / "o", "--labels-per-class", "50"))
    assert "fewer than the 50 labels" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(str(tmp_path / "missing.npz"), tmp_path / "o2"))
    assert "does not exist" in str(e.value.code)


def test_help_documents_every_flag():
    p = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--help"],
                       capture_output=True, text=True, cwd=HERE)
    flags = ("--dataset --data-dir --labels-per-class --loss --seed --epochs --steps-per-epoch "
             "--batch-size --mu --lr --wd --threshold --pl-temp --temp --low-weight "
             "--entropy-ratio --entropy-weighting --entropy-epochs --ema-decay --arch --device "
             "--amp --no-amp --compile --out --eval-every --save-every --skip-nonfinite").split()
    for f in flags:
        assert f in p.stdout, f
    text = " ".join(p.stdout.split())  # help lines wrap
    assert "(default: 0.03)" in text and "(default: 256)" in text and "(default: 0.999)" in text


STUB_PYTHON = """#!/usr/bin/env bash
# stands in for python: train.py records when it ran on which GPU, sleeps, and fails for one cell
if [ "${1##*/}" = train.py ]; then
  while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
  echo "start $CUDA_VISIBLE_DEVICES $(date +%s.%N) $out" >> "$RECORD"
  sleep 0.6
  echo "end $CUDA_VISIBLE_DEVICES $(date +%s.%N) $out" >> "$RECORD"
  case $out in *cifar100_25*) echo "boom" >&2; exit 3;; esac
  mkdir -p "$out"
else
  exec "$REAL_PYTHON" "$@"
fi
"""


def test_gpus_run_one_job_per_gpu_and_report_failures(tmp_path):
    stub = tmp_path / "stub"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    record = tmp_path / "record.txt"
    env = dict(os.environ, GPUS="0 1", METHODS="base entropy ccssl", PYTHON=str(stub),
               REAL_PYTHON=sys.executable, RECORD=str(record), OUT_DIR=str(tmp_path / "out"))
    p = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr  # one cell failed: reported, not fatal
    events = [l.split() for l in record.read_text().splitlines()]
    starts = [e for e in events if e[0] == "start"]
    assert len(starts) == 12 and {e[1] for e in starts} == {"0", "1"}
    assert len([e for e in events if e[0] == "end"]) == 12  # every job ran to its end
    for gpu in ("0", "1"):  # on each GPU the jobs never overlap
        spans = {}
        for kind, g, t, out in events:
            if g == gpu:
                spans.setdefault(out, {})[kind] = float(t)
        ordered = sorted(spans.values(), key=lambda s: s["start"])
        assert all(a["end"] <= b["start"] for a, b in zip(ordered, ordered[1:]))
    failed = [f"cifar100_25_{m}_s0.log" for m in ("base", "entropy", "ccssl")]
    assert "3 job(s) failed" in p.stderr and all(f in p.stderr for f in failed)
    assert "boom" in (tmp_path / "out" / "cifar100_25_base_s0.log").read_text()
    dry = subprocess.run(["bash", os.path.join(HERE, "run_all.sh")], capture_output=True, text=True,
                         env=dict(env, DRY_RUN="1"))
    gpus = [l.split()[0] for l in dry.stdout.splitlines()[:-1]]
    assert gpus == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"] * 6
