"""What a run shows while it trains: per-class pseudo-label counters and the pseudo-label
confusion (against loops), and TensorBoard scalars (tags, steps, no duplicates after a resume)."""
import json
import signal

import numpy as np
import pytest
import torch

import logs
import config
import methods
import report
import train
from conftest import tiny_args
from test_methods import make_out, K, U, Args, ProtoModel
from test_reliability import run_cli


def test_pl_confusion_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    k, n = 7, 200
    y, pred = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
    conf = torch.rand(n, generator=g) < 0.4
    sel = ~conf & (torch.rand(n, generator=g) < 0.5)
    group = torch.where(conf, 0, torch.where(sel, 1, 2))
    got = methods.pl_confusion(y, pred, group, k)
    ref = np.zeros((3, k, k))
    for i in range(n):
        g = 0 if conf[i] else 1 if sel[i] else 2
        ref[g, y[i], pred[i]] += 1
    assert np.array_equal(got.numpy(), ref)


@pytest.mark.parametrize("step", ["contrastive", "fixmatch"])
def test_per_class_counters_sum_to_the_global_counters(step):
    torch.manual_seed(3)
    o = make_out(n_strong=2)
    a = Args()
    if step == "contrastive":
        model = ProtoModel(torch.cat([o.z_w[:3] * 5, torch.randn(K - 3, o.z_w.shape[1])]))
        _, diag, conf = methods.contrastive_step(o, model, a)
    else:
        _, diag, conf = methods.fixmatch_step(o, None, a)
    d = dict(zip(methods.DIAG, diag.tolist()))
    pc = logs.per_class_pl(conf)
    assert sum(pc["assigned_confident"]) == d["confident"] > 0
    assert sum(pc["assigned_selected"]) == d["entropy_selected"]
    assert sum(pc["correct_confident"]) == d["correct_confident"]
    assert sum(pc["correct_selected"]) == d["correct_selected"]
    assert conf.sum() == U  # every unlabeled sample is in one group


def test_run_writes_per_class_statistics_and_the_confusion(tiny_npz, tmp_path):
    out = tmp_path / "r"
    train.main(tiny_args(tiny_npz, out))
    m = [json.loads(l) for l in open(out / "metrics.jsonl")]
    cm = np.load(out / "pl_confusion.npy")
    assert cm.shape == (3, 3, 3) and cm.dtype == np.int64
    last = m[-1]["pl_per_class"]
    assert last["assigned_confident"] == cm[0].sum(0).tolist()
    assert last["correct_selected"] == np.diagonal(cm[1]).tolist()
    n_ulb = 3 * 2 * 4  # steps per epoch x mu x B
    assert cm[0].sum() == round(m[-1]["confident"] * n_ulb)
    assert cm[1].sum() == round(m[-1]["entropy_selected"] * n_ulb)
    assert cm.sum() == n_ulb


# ---------------------------------------------------------------- TensorBoard

def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars(tiny_npz, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "r"
    train.main(tiny_args(tiny_npz, out, "--tensorboard"))
    ev = read_events(out / "tb")
    for tag in ("eval/test_acc", "eval/confident", "eval/entropy_selected", "eval/mean_weight",
                "eval/loss"):
        assert ev[tag] == [3, 6], tag
    assert set(ev["eval/pl_acc_confident"]) <= {3, 6}  # no point where no sample was confident
    assert ev["train/loss"] == ev["train/lr"] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_without_the_flag_writes_nothing(tiny_npz, tmp_path):
    train.main(tiny_args(tiny_npz, tmp_path / "r"))
    assert not (tmp_path / "r" / "tb").exists()


def test_tensorboard_after_kill_and_resume_has_no_step_twice(tiny_npz, tmp_path):
    pytest.importorskip("tensorboard")
    extra = ["--epochs", "3", "--steps-per-epoch", "4", "--save-every", "1", "--tensorboard"]
    out = tmp_path / "r"
    rc, log = run_cli(tiny_args(tiny_npz, out, *extra), kill_after_step=7)
    assert rc == -signal.SIGKILL, log
    rc, log = run_cli(tiny_args(tiny_npz, out, *extra))
    assert rc == 0 and "resumed from" in log, log
    ev = read_events(out / "tb")
    assert ev["train/loss"] == list(range(1, 13))
    assert ev["eval/test_acc"] == [4, 8, 12]


def test_tensorboard_missing_is_one_line(tiny_npz, tmp_path, monkeypatch, capsys):
    real = config.importlib.import_module

    def no_tb(name, *a):
        if "tensorboard" in name:
            raise ImportError(name)
        return real(name, *a)
    monkeypatch.setattr(config.importlib, "import_module", no_tb)
    with pytest.raises(SystemExit):
        config.get_args(tiny_args(tiny_npz, tmp_path / "r", "--tensorboard"))
    assert "pip install tensorboard" in capsys.readouterr().err


# ---------------------------------------------------------------- plots

def png_size(path):
    from PIL import Image
    with Image.open(path) as im:
        return im.size


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    from conftest import write_tiny_npz
    d = tmp_path_factory.mktemp("runs")
    npz = write_tiny_npz(d / "tiny.npz")
    base = lambda out: [a for a in tiny_args(npz, out, "--loss", "base")  # noqa: E731
                        if a not in ("--entropy-ratio", "0.5")]
    train.main(tiny_args(npz, d / "entropy"))
    train.main(base(d / "base"))
    train.main(base(d / "mu0") + ["--mu", "0"])  # the last --mu wins
    return [str(d / n) for n in ("entropy", "base", "mu0")]


@pytest.mark.parametrize("n", [1, 3])
def test_plot_writes_a_png_for_one_and_three_runs(three_runs, tmp_path, n, capsys):
    pytest.importorskip("matplotlib")
    import evaluate
    out = tmp_path / "fig.png"
    evaluate.main(["--plot", *three_runs[:n], "--out", str(out)])  # the 3rd run has --mu 0
    assert png_size(out) == (1200, 850)
    assert not list(tmp_path.glob("*.tmp*"))


def test_plot_confusion_and_per_class(three_runs, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import evaluate
    out = tmp_path / "cm.png"
    evaluate.main(["--plot-confusion", three_runs[0], "--out", str(out)])
    assert png_size(out) == (1200, 550)
    evaluate.main([three_runs[0], "--per-class"])
    text = capsys.readouterr().out
    assert "precision / recall" in text and "c0" in text and "c2" in text


def test_precision_recall_by_hand():
    pl = np.zeros((3, 2, 2))
    pl[0] = [[3, 1], [0, 2]]  # confident: 3 right of class 0, 1 class-0 image called 1, 2 right 1
    pl[1] = [[0, 0], [2, 0]]  # selected: 2 class-1 images called 0
    pl[2] = [[4, 0], [0, 5]]  # unconfident: seen, not given a label
    prec, rec = report.pl_precision_recall(pl)
    assert prec == pytest.approx([3 / 5, 2 / 3]) and rec == pytest.approx([3 / 8, 2 / 9])


@pytest.mark.parametrize("argv", [["--plot", "nowhere", "--out", "x.png"],
                                  ["--plot-confusion", "nowhere", "--out", "x.png"]])
def test_plot_bad_run_dir_is_one_line(argv, capsys):
    import evaluate
    with pytest.raises(SystemExit):
        evaluate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert "nowhere is not a run directory" in err[-1]
