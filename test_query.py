"""Active learning (docs/active_learning.md): train.py --labeled-idx, query.py's scores,
selection, k-means and TypiClust, index mapping through a real query, and al.sh end to end."""
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

import config
import data
import evaluate
import query
import report
import train
from conftest import drop, tiny_args
from model import Encoder

HERE = os.path.dirname(os.path.abspath(__file__))


def sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def exit_text(e, capsys):
    """The lines a user sees: argparse's stderr, or the message of sys.exit("...")."""
    code = e.value.code
    return (capsys.readouterr().err + (code if isinstance(code, str) else "")).strip().splitlines()


def naive_entropy(row):
    return -sum(p * math.log(p) for p in row if p > 0)


# ---------------------------------------------------------------- scores

def test_entropy_margin_least_confidence_against_loops():
    p = torch.softmax(torch.randn(50, 7, dtype=torch.float64) * 3, dim=1)
    h, m, lc = query.entropy(p), query.margin(p), query.least_confidence(p)
    for i, row in enumerate(p.tolist()):
        s = sorted(row, reverse=True)
        assert h[i].item() == pytest.approx(naive_entropy(row), abs=1e-12)
        assert m[i].item() == pytest.approx(s[0] - s[1], abs=1e-12)
        assert lc[i].item() == pytest.approx(1 - s[0], abs=1e-12)


def test_entropy_of_uniform_is_log_k_and_of_one_hot_is_zero_without_nan():
    for k in (2, 10, 100):
        assert query.entropy(torch.full((1, k), 1.0 / k, dtype=torch.float64)).item() == \
            pytest.approx(math.log(k), rel=1e-12)
    one_hot = torch.eye(5)  # exact zeros
    h = query.entropy(one_hot)
    assert torch.equal(h, torch.zeros(5)) and not h.isnan().any()
    assert torch.equal(query.margin(one_hot), torch.ones(5))
    assert torch.equal(query.least_confidence(one_hot), torch.zeros(5))


def test_margin_and_least_confident_order_hand_made_rows():
    p = torch.tensor([[0.5, 0.49, 0.01], [0.9, 0.05, 0.05], [0.4, 0.3, 0.3], [0.34, 0.33, 0.33]])
    assert query.margin(p).argsort().tolist() == [0, 3, 2, 1]  # smallest margin first
    assert query.least_confidence(p).argsort(descending=True).tolist() == [3, 2, 0, 1]


def test_for_two_classes_the_three_uncertainty_rankings_agree():
    q = torch.rand(200, dtype=torch.float64)
    p = torch.stack([q, 1 - q], 1)
    idx = np.arange(200)
    by_h = query.top_n(query.entropy(p).numpy(), idx, 200)
    by_m = query.top_n(-query.margin(p).numpy(), idx, 200)
    by_lc = query.top_n(query.least_confidence(p).numpy(), idx, 200)
    assert by_h.tolist() == by_m.tolist() == by_lc.tolist()


# ---------------------------------------------------------------- selection

def test_top_n_breaks_ties_by_the_smaller_index():
    pri = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    idx = np.array([40, 30, 10, 20, 50])
    assert idx[query.top_n(pri, idx, 4)].tolist() == [10, 30, 50, 20]


@pytest.mark.parametrize("n, k", [(15, 10), (20, 10), (7, 3), (40, 10), (3, 5)])
def test_balanced_entropy_counts_differ_by_at_most_one(n, k):
    rng = np.random.default_rng(n * k)
    m = 400
    h, pred, idx = rng.random(m), rng.integers(0, k, m), np.sort(rng.choice(10_000, m, replace=False))
    pick = query.balanced_top_n(h, pred, idx, n)
    assert len(pick) == n == len(set(pick.tolist()))
    counts = np.bincount(pred[pick], minlength=k)
    assert counts.max() - counts.min() <= 1 and counts.max() <= -(-n // k)
    # within a class the most uncertain go first
    for c in range(k):
        mine = pick[pred[pick] == c]
        rest = np.setdiff1d(np.flatnonzero(pred == c), mine)
        if len(mine) and len(rest):
            assert h[mine].min() >= h[rest].max()


def test_balanced_entropy_fills_the_shortfall_of_a_rare_class_by_entropy():
    pred = np.array([0] * 30 + [1] * 30 + [2] * 1)
    h = np.linspace(1, 0, 61)
    idx = np.arange(61)
    pick = query.balanced_top_n(h, pred, idx, 12)  # quota 4 each; class 2 has one candidate
    counts = np.bincount(pred[pick], minlength=3)
    assert len(pick) == 12 and counts[2] == 1 and counts.sum() == 12
    assert sorted(counts[:2].tolist()) == [5, 6]  # the 3 missing filled from the other classes


def test_kmeans_recovers_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:6] * 10
    true = torch.arange(600) % 6
    x = centers[true] + 0.1 * torch.randn(600, 8, generator=g)
    assign = query.kmeans(x, 6, 20, torch.Generator().manual_seed(1))
    for c in range(6):  # one cluster per true group, nothing mixed
        assert len(set(assign[true == c].tolist())) == 1
    assert len(set(assign.tolist())) == 6


def test_kmeans_reseeds_empty_clusters_and_is_deterministic():
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2) * 5, torch.tensor([[20.0, 20.0]])])
    a1 = query.kmeans(x, 3, 10, torch.Generator().manual_seed(3))
    a2 = query.kmeans(x, 3, 10, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2)
    assert len(set(a1.tolist())) == 3  # the outlier gets its own cluster
    with pytest.raises(ValueError, match="k-means needs"):
        query.kmeans(x, 200, 1, torch.Generator())


def test_typicality_against_a_loop():
    x = torch.randn(30, 4, dtype=torch.float64)
    t = query.typicality(x, knn=5)
    for i in range(30):
        d = sorted(torch.dist(x[i], x[j]).item() for j in range(30) if j != i)[:5]
        assert t[i].item() == pytest.approx(1 / (sum(d) / 5), rel=1e-9)
    assert query.typicality(x[:1]).item() == 0


def test_typical_takes_the_most_typical_point_of_each_largest_unlabeled_cluster():
    g = torch.Generator().manual_seed(0)
    sizes = [60, 50, 40, 30, 20]
    x, true = [], []
    for c, s in enumerate(sizes):
        pts = 0.3 * torch.randn(s, 5, generator=g)
        x.append(pts + 20 * torch.eye(5)[c])
        true += [c] * s
    x, true = torch.cat(x), np.array(true)
    starts = np.cumsum([0] + sizes[:-1])
    is_labeled = np.zeros(len(x), dtype=bool)
    is_labeled[starts[0] + 5] = True  # the largest cluster already holds a label
    # k = 1 labeled + 4 = 5 clusters = the true groups; the 4 largest without a label: 1, 2, 3, 4
    rows, score = query.typical_n(x, is_labeled, 4, 20, seed=0)
    assert true[rows].tolist() == [1, 2, 3, 4]  # largest first
    for r in rows:  # the most typical of its cluster, written out as a loop
        members = np.flatnonzero(true == true[r])
        typ = []
        for i in members:
            d = sorted(torch.dist(x[i], x[j]).item() for j in members if j != i)[:20]
            typ.append(1 / (sum(d) / len(d)))
        assert r == members[int(np.argmax(typ))]
    assert (score > 0).all() and not is_labeled[rows].any()


def test_typical_never_picks_a_labeled_image_and_can_take_the_whole_pool():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(2))
    is_labeled = np.zeros(30, dtype=bool)
    is_labeled[[0, 11, 29]] = True
    rows, _ = query.typical_n(x, is_labeled, 27, 10, seed=0)
    assert sorted(rows.tolist()) == np.flatnonzero(~is_labeled).tolist()
    # identical images: one non-empty cluster, holding the labeled image; all equally typical
    rows, _ = query.typical_n(torch.zeros(10, 3), np.arange(10) == 0, 3, 5, seed=0)
    assert rows.tolist() == [1, 2, 3]


# ---------------------------------------------------------------- index mapping through query.py

class IndexModel(torch.nn.Module):
    """Reads the dataset index written into pixel (0, 0) of each image and returns scores whose
    uncertainty is a known function of it: cos scores (u(i), 0, 0), u = (37 i mod 101) / 101, so
    the entropy falls as u grows; z = a fixed function of the index too."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)  # a buffer that must not move

    def scores_and_features(self, x):
        u8 = torch.round(x[:, :, 0, 0] * 255)  # Normalize with mean 0, std 1 is x / 255
        i = (u8[:, 0] * 256 + u8[:, 1]).long()
        u = ((37 * i) % 101).double() / 101
        scores = torch.stack([u, torch.zeros_like(u), torch.zeros_like(u)], 1).float()
        z = torch.nn.functional.normalize(torch.stack([u, 1 - u], 1).float(), dim=1)
        return scores, z, z


def index_dataset(path, n=300, k=3):
    x = np.zeros((n, 8, 8, 3), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    y = np.random.default_rng(0).integers(0, k, n)
    np.savez(path, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10],
             classes=np.array(["a", "b", "c"]))
    return y


def fake_run(tmp_path, y, labeled, unlabeled=None, loss="base"):
    run = tmp_path / "run"
    run.mkdir()
    state = {"args": {"dataset": f"npz:{tmp_path / 'idx.npz'}", "data_dir": "data", "loss": loss,
                      "arch": "wrn-10-1", "epochs": 1, "steps_per_epoch": 1, "pl_temp": 0.5},
             "step": 1, "ema": {}, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
             "labeled_idx": torch.tensor(labeled), "classes": ["a", "b", "c"]}
    if unlabeled is not None:
        state["unlabeled_idx"] = torch.tensor(unlabeled)
    torch.save(state, run / "last.pt")
    return str(run)


@pytest.fixture
def index_run(tmp_path, monkeypatch):
    y = index_dataset(tmp_path / "idx.npz")
    monkeypatch.setattr(query, "load_run_model", lambda state, k, dev: IndexModel())
    rng = np.random.default_rng(1)
    labeled = np.sort(rng.choice(300, 25, replace=False))
    unlabeled = rng.permutation(np.setdiff1d(np.arange(300), [7, 8, 9]))  # not in index order
    return fake_run(tmp_path, y, labeled, unlabeled), labeled, unlabeled


def run_query(run, out, *extra):
    query.main([run, "--out", str(out), "--device", "cpu", *extra])
    return np.loadtxt(out, dtype=np.int64)


@pytest.mark.parametrize("strategy", ["entropy", "margin", "least-confident"])
def test_query_picks_the_expected_indices(index_run, tmp_path, strategy):
    run, labeled, unlabeled = index_run
    pool = sorted(set(unlabeled.tolist()) - set(labeled.tolist()))
    # written out: smallest u = most uncertain; ties (equal u) to the smaller index
    expected = sorted(pool, key=lambda i: ((37 * i) % 101, i))[:12]
    out = tmp_path / "next.txt"
    got = run_query(run, out, "--n", "12", "--strategy", strategy)
    assert got.tolist() == sorted(set(labeled.tolist()) | set(expected))
    with open(str(out)[:-4] + ".csv") as fh:
        rows = [line.split(",") for line in fh.read().splitlines()[1:]]
    assert [int(r[1]) for r in rows] == expected and [int(r[0]) for r in rows] == list(range(1, 13))


class TableModel(IndexModel):
    """Scores of three classes drawn per dataset index from a fixed table, so that entropy,
    margin and least-confidence rank the pool differently, and differently again without T_pl."""
    TABLE = torch.from_numpy(np.random.default_rng(10).normal(0, 1.0, (300, 3)))

    def scores_and_features(self, x):
        _, z, _ = super().scores_and_features(x)
        u8 = torch.round(x[:, :, 0, 0] * 255)
        i = (u8[:, 0] * 256 + u8[:, 1]).long()
        return self.TABLE[i].float(), z, z


def _expected_top(pool, strategy, t, n=12):
    """The n most uncertain of the pool by loops in float64 over softmax(s / t); ties by index."""
    def score(i):
        s = [v / t for v in TableModel.TABLE[i].float().double().tolist()]
        e = [math.exp(v - max(s)) for v in s]
        p = sorted((v / sum(e) for v in e), reverse=True)
        return {"entropy": -naive_entropy(p), "margin": p[0] - p[1], "least-confident": p[0]}[strategy]
    return sorted(pool, key=lambda i: (score(i), i))[:n]


@pytest.mark.parametrize("loss", ["base", "fixmatch"])
def test_uncertainty_strategies_rank_differently_and_use_t_pl(index_run, tmp_path, monkeypatch,
                                                              loss):
    """The method's own probabilities: softmax(cos / T_pl) for prototype runs (T_pl 0.5 in the
    fake run), softmax(logits) for the peers; a query that forgets T_pl, or computes one strategy
    with another's score, picks other images."""
    run, labeled, unlabeled = index_run
    if loss == "fixmatch":
        state = torch.load(os.path.join(run, "last.pt"), weights_only=False)
        state["args"]["loss"] = "fixmatch"
        state["ema"] = {"classifier.weight": torch.zeros(3, 2)}  # how a peer run is recognised
        torch.save(state, os.path.join(run, "last.pt"))
    monkeypatch.setattr(query, "load_run_model", lambda state, k, dev: TableModel())
    pool = sorted(set(unlabeled.tolist()) - set(labeled.tolist()))
    t = 0.5 if loss == "base" else 1.0
    want = {s: _expected_top(pool, s, t) for s in ("entropy", "margin", "least-confident")}
    other_t = {s: _expected_top(pool, s, 1.0 if t != 1.0 else 0.5) for s in want}
    assert len({tuple(sorted(v)) for v in want.values()}) == 3, "test model: rankings agree"
    assert all(set(want[s]) != set(other_t[s]) for s in want), "test model: T does not matter"
    for strategy, expected in want.items():
        got = run_query(run, tmp_path / f"{strategy}.txt", "--n", "12", "--strategy", strategy)
        new = sorted(set(got.tolist()) - set(labeled.tolist()))
        assert new == sorted(expected), (
            f"{strategy} ({loss}) picked other images than softmax(scores / {t}) ranks first"
            + ((" (the ones without T_pl)" if loss == "base" else " (T_pl applied to logits)")
               if new == sorted(other_t[strategy]) else ""))


def test_query_files_are_deterministic_and_never_use_the_labels(index_run, tmp_path):
    run, labeled, _ = index_run
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    for strategy in ("random", "balanced-entropy", "typical"):
        run_query(run, a, "--n", "10", "--strategy", strategy, "--seed", "3")
        d = dict(np.load(tmp_path / "idx.npz"))
        d["y_train"] = np.random.default_rng(5).permutation(d["y_train"])  # another oracle
        np.savez(tmp_path / "idx.npz", **d)
        run_query(run, b, "--n", "10", "--strategy", strategy, "--seed", "3")
        for ext in (".txt", ".csv"):
            assert sha(str(a)[:-4] + ext) == sha(str(b)[:-4] + ext), strategy
        new = np.setdiff1d(np.loadtxt(a, dtype=np.int64), labeled)
        assert len(new) == 10 and not set(new) & set(labeled.tolist())
        assert not {7, 8, 9} & set(new.tolist())  # outside the run's unlabeled set
    rec = json.load(open(tmp_path / "b.json"))
    assert rec["pool_size"] == len(set(range(300)) - {7, 8, 9} - set(labeled.tolist()))
    assert rec["labeled_after"] == 35
    assert rec["checkpoint_sha256"] == sha(os.path.join(run, "last.pt"))
    assert sum(rec["per_predicted_class"].values()) == 10


def test_random_rounds_continue_one_random_order(tmp_path, monkeypatch):
    """Two rounds of 10 with the same seed = one round of 20: sampling without replacement."""
    y = index_dataset(tmp_path / "idx.npz")
    monkeypatch.setattr(query, "load_run_model", lambda state, k, dev: IndexModel())
    labeled = np.arange(0, 300, 17)
    both = np.setdiff1d(run_query(fake_run(tmp_path, y, labeled), tmp_path / "b.txt", "--n", "20",
                                  "--strategy", "random"), labeled)
    first = run_query(os.path.join(tmp_path, "run"), tmp_path / "r1.txt", "--n", "10",
                      "--strategy", "random")
    os.rename(tmp_path / "run", tmp_path / "run0")
    second = run_query(fake_run(tmp_path, y, first), tmp_path / "r2.txt", "--n", "10",
                       "--strategy", "random")
    assert np.array_equal(np.setdiff1d(second, labeled), both)


def test_out_may_not_be_the_runs_own_labeled_set_from_any_directory(index_run, tmp_path,
                                                                     monkeypatch):
    run, _, _ = index_run
    state = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    state["args"]["labeled_idx"], state["cwd"] = "lab.txt", str(tmp_path)
    torch.save(state, os.path.join(run, "last.pt"))
    (tmp_path / "lab.txt").write_text("1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SystemExit, match="is the labeled set the run was trained on"):
        query.main([run, "--n", "2", "--strategy", "entropy", "--device", "cpu",
                    "--out", str(tmp_path / "lab.txt")])
    assert (tmp_path / "lab.txt").read_text() == "1\n"
    run_query(run, "lab.txt", "--n", "2", "--strategy", "entropy")  # another lab.txt: fine


def test_random_depends_on_the_seed_only(index_run, tmp_path):
    run, _, _ = index_run
    a = run_query(run, tmp_path / "a.txt", "--n", "10", "--strategy", "random", "--seed", "0")
    b = run_query(run, tmp_path / "b.txt", "--n", "10", "--strategy", "random", "--seed", "1")
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("argv, msg", [
    (["--n", "0"], "--n must be >= 1"),
    (["--n", "1000"], "unlabeled images left"),
    (["--n", "2", "--out", "x.csv"], "FILE.txt or FILE.npy"),
    (["--n", "2", "--seed", "-1"], "--seed must be >= 0"),
    (["--n", "2", "--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--n", "2", "--out", "/"], "is a directory"),
])
def test_bad_query_arguments_are_one_line_errors(index_run, tmp_path, capsys, argv, msg):
    run, _, _ = index_run
    out = ["--out", str(tmp_path / "n.txt")] if "--out" not in argv else []
    with pytest.raises(SystemExit) as e:
        query.main([run, "--strategy", "entropy", "--device", "cpu", *out, *argv])
    err = exit_text(e, capsys)
    assert msg in err[-1] and "Traceback" not in "\n".join(err)


def test_query_of_a_file_that_is_not_a_run_is_one_line(tmp_path):
    torch.save({"a": 1}, tmp_path / "junk.pt")
    with pytest.raises(SystemExit, match="is not a checkpoint of train.py"):
        query.main([str(tmp_path / "junk.pt"), "--n", "1", "--strategy", "entropy",
                    "--out", str(tmp_path / "n.txt"), "--device", "cpu"])


def test_query_of_a_missing_run_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint found"):
        query.main([str(tmp_path / "nope"), "--n", "1", "--strategy", "entropy",
                    "--out", str(tmp_path / "n.txt")])


# ---------------------------------------------------------------- with a real run

def test_scoring_leaves_batchnorm_and_the_checkpoint_untouched(tiny_npz, tmp_path):
    m = Encoder(3, "wrn-10-1").train()
    for mod in m.modules():  # non-trivial statistics, so a change would show
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8)
    norm = data.Normalize([0.5] * 3, [0.2] * 3, "cpu")
    s1 = evaluate.outputs_all(m, x, norm, batch_size=4)
    s2 = evaluate.outputs_all(m, x, norm, batch_size=3)
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    for a, b in zip(s1, s2):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(s1[0], m.eval().class_scores(norm(x)), atol=1e-6)


def test_round_trip_query_then_train_with_labeled_idx(tiny_npz, tmp_path):
    train.main(tiny_args(tiny_npz, tmp_path / "r0"))
    ckpt = tmp_path / "r0" / "last.pt"
    digest = sha(ckpt)
    outs = []
    for name in ("a", "b"):
        query.main([str(tmp_path / "r0"), "--n", "5", "--strategy", "typical",
                    "--out", str(tmp_path / f"{name}.txt"), "--device", "cpu"])
        outs.append(open(tmp_path / f"{name}.txt").read())
    assert outs[0] == outs[1] and sha(ckpt) == digest
    res = train.main(drop(tiny_args(tiny_npz, tmp_path / "r1"), "--labels-per-class")
                     + ["--labeled-idx", str(tmp_path / "a.txt")])
    assert sum(res["labeled_counts"]) == 6 + 5
    assert res["args"]["labeled_idx_sha256"] == sha(tmp_path / "a.txt")
    state = torch.load(tmp_path / "r1" / "last.pt", weights_only=True)
    assert state["labeled_idx"].tolist() == [int(v) for v in outs[0].splitlines()[1:]]  # after the
    assert outs[0].startswith("# query ")  # query id line
    table = report.table1(str(tmp_path))
    assert "| --labeled-idx | entropy |" in table and "sha256" not in table


# ---------------------------------------------------------------- train.py --labeled-idx

def lidx_args(npz, out, path):
    return drop(tiny_args(npz, out), "--labels-per-class") + ["--labeled-idx", str(path)]


@pytest.mark.parametrize("content, msg", [
    ("1\n2\nx\n", "line 3: 'x' is not an integer"),
    ("1\n2\n2\n", "index 2 appears 2 times"),
    ("-1\n3\n", "negative index -1"),
    ("# nothing\n\n", "no indices"),
    ("1\n60\n", "index 60 is out of range: the training set has 60 images"),
    ("1_0\n", "'1_0' is not an integer"),
    ("+2\n", "'+2' is not an integer"),
    ("\u0663\n", "is not an integer"),
    ("99999999999999999999999\n", "far out of range"),
])
def test_bad_labeled_idx_files_are_one_line_errors(tiny_npz, tmp_path, capsys, content, msg):
    f = tmp_path / "idx.txt"
    f.write_text(content)
    with pytest.raises(SystemExit) as e:
        train.main(lidx_args(tiny_npz, tmp_path / "run", f))
    err = exit_text(e, capsys)
    assert msg in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()


def test_labeled_idx_npy_comments_and_flag_conflicts(tiny_npz, tmp_path, capsys):
    np.save(tmp_path / "i.npy", np.array([[1, 2]]))
    with pytest.raises(SystemExit):
        config.get_args(lidx_args(tiny_npz, tmp_path / "run", tmp_path / "i.npy"))
    assert "1-D integer array" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config.get_args(tiny_args(tiny_npz, tmp_path / "run", "--labeled-idx", str(tmp_path / "i.npy")))
    assert "do not combine it with --labels-per-class" in capsys.readouterr().err
    np.save(tmp_path / "i.npy", np.array([5, 1, 3]))
    (tmp_path / "i.txt").write_text("# chosen by hand\n5\n 1 \n\n3  # a comment\n")
    assert data.read_index_file(str(tmp_path / "i.npy")).tolist() == [1, 3, 5]
    np.save(tmp_path / "u.npy", np.array([2**63 + 5], dtype=np.uint64))
    with pytest.raises(ValueError, match="far out of range"):
        data.read_index_file(str(tmp_path / "u.npy"))
    with pytest.raises(ValueError, match="is a directory"):
        data.read_index_file(str(tmp_path))
    assert data.read_index_file(str(tmp_path / "i.txt")).tolist() == [1, 3, 5]


def test_classes_without_labels_are_a_warning(tiny_npz, tmp_path, capsys):
    f = tmp_path / "idx.txt"
    f.write_text("0\n3\n")  # class 0 only (the tiny dataset's labels cycle 0, 1, 2)
    args = lidx_args(tiny_npz, tmp_path / "run", f)
    train.main(args[:args.index("--epochs") + 1] + ["1"] + args[args.index("--epochs") + 2:])
    assert "warning: 2 of 3 classes have no labeled image: c1, c2" in capsys.readouterr().err


def test_resume_with_another_labeled_set_is_refused(tiny_npz, tmp_path):
    f = tmp_path / "idx.txt"
    f.write_text("0\n1\n2\n3\n4\n5\n")
    args = lidx_args(tiny_npz, tmp_path / "run", f)
    train.main(args[:args.index("--epochs") + 1] + ["1"] + args[args.index("--epochs") + 2:])
    f.write_text("0\n1\n2\n3\n4\n6\n")
    with pytest.raises(SystemExit, match="labeled_idx_sha256"):
        train.main(args)


# ---------------------------------------------------------------- al.sh

AL_ENV = {"INIT": "2", "N_QUERY": "4", "ROUNDS": "2", "SEEDS": "0", "STRATEGIES": "random entropy",
          "QUERY_ARGS": "--device cpu", "ENTROPY_RATIO": "0.5"}


def al_env(tiny_npz, out, **more):
    extra = drop(tiny_args(tiny_npz, "x"), "--dataset", "--labels-per-class", "--out",
                 "--entropy-ratio")
    return {**os.environ, "OUT_DIR": str(out), "DATASET": f"npz:{tiny_npz}",
            "EXTRA_ARGS": shlex.join(extra), "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable,  # the interpreter the tests run under, not python from PATH
            **AL_ENV, **more}


def test_al_dry_run_prints_every_round(tiny_npz, tmp_path):
    out = subprocess.run(["bash", os.path.join(HERE, "al.sh")], env=al_env(tiny_npz, tmp_path / "al",
                         DRY_RUN="1", SEEDS="0 1"), capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert sum("train.py" in ln for ln in lines) == 2 * (1 + 2 * 2)
    assert sum("query.py" in ln for ln in lines) == 2 * 2 * 2
    assert "--labeled-idx" in lines[2] and "s0/random/r1.txt" in lines[2]
    assert "evaluate.py --al-table" in lines[-1] and shlex.split(lines[-1])[0] == sys.executable
    assert not (tmp_path / "al").exists()


def test_al_sh_end_to_end_resumes_and_tabulates(tiny_npz, tmp_path):
    env = al_env(tiny_npz, tmp_path / "al")
    subprocess.run(["bash", os.path.join(HERE, "al.sh")], env=env, capture_output=True, text=True,
                   check=True, cwd=tmp_path)
    al = tmp_path / "al"
    for strategy in ("random", "entropy"):
        for r, n in ((1, 10), (2, 14)):
            assert len(np.loadtxt(al / "s0" / strategy / f"r{r}.txt")) == n
            res = json.load(open(al / "s0" / strategy / f"r{r}" / "result.json"))
            assert sum(res["labeled_counts"]) == n and res["args"]["seed"] == 0
    md = open(al / "al_table.md").read()
    assert "| random |" in md and "round 2 (14 labels)" in md
    csv = open(al / "al_table.csv").read().splitlines()
    assert csv[0].startswith("strategy,round,labeled") and len(csv) == 1 + 2 * 3 + 2
    again = subprocess.run(["bash", os.path.join(HERE, "al.sh")], env=env, capture_output=True,
                           text=True, check=True, cwd=tmp_path)
    assert "train.py" not in again.stdout and "steps x" not in again.stdout  # all skipped
    other = subprocess.run(["bash", os.path.join(HERE, "al.sh")], env=dict(env, N_QUERY="5"),
                           capture_output=True, text=True, cwd=tmp_path)
    assert other.returncode == 2 and "holds rounds made with other settings" in other.stderr


def test_al_sh_needs_beta_where_the_paper_has_none(tiny_npz, tmp_path):
    r = subprocess.run(["bash", os.path.join(HERE, "al.sh")],
                       env=al_env(tiny_npz, tmp_path / "al", ENTROPY_RATIO="", DRY_RUN="1"),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "set ENTROPY_RATIO" in r.stderr and not r.stdout
    r = subprocess.run(["bash", os.path.join(HERE, "al.sh")],
                       env=al_env(tiny_npz, tmp_path / "al", ROUNDS="x"), capture_output=True, text=True)
    assert r.returncode == 2 and "ROUNDS must be a whole number" in r.stderr
    r = subprocess.run(["bash", os.path.join(HERE, "al.sh")],
                       env=al_env(tiny_npz, tmp_path / "al", STRATEGIES="random bogus"),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown strategy 'bogus'" in r.stderr and not r.stdout
    assert not (tmp_path / "al").exists()


def test_al_table_means_and_area_under_the_curve(tmp_path):
    def put(path, n, acc):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "result.json"), "w") as fh:
            json.dump({"final_acc": acc, "labeled_counts": [n]}, fh)
    for seed, off in ((0, 0.0), (1, 0.1)):
        put(tmp_path / f"s{seed}" / "r0", 10, 0.2 + off)
        put(tmp_path / f"s{seed}" / "random" / "r1", 20, 0.4 + off)
        put(tmp_path / f"s{seed}" / "random" / "r2", 40, 0.5 + off)
    put(tmp_path / "s0" / "typical" / "r1", 20, 0.6)
    md, csv = report.al_table(str(tmp_path))
    # seed 0: (10*(20+40)/2 + 20*(40+50)/2) / 30 = 40; seed 1: 50
    assert "| random | 25.00 ± 7.07 (2 seeds) | 45.00 ± 7.07 (2 seeds) | 55.00 ± 7.07 (2 seeds) | " \
           "45.00 ± 7.07 (2 seeds) |" in md
    assert "| typical | 25.00 ± 7.07 (2 seeds) | 60.00 (1 seed) | not run | not run |" in md
    assert "random,auc,,2,45.0000,7.0711,40.00 50.00" in csv


def test_al_table_with_round_0_only(tmp_path):
    os.makedirs(tmp_path / "s0" / "r0")
    with open(tmp_path / "s0" / "r0" / "result.json", "w") as fh:
        json.dump({"final_acc": 0.3, "labeled_counts": [5, 5]}, fh)
    md, _ = report.al_table(str(tmp_path))
    assert "round 0 (10 labels)" in md and "30.00 (1 seed)" in md


def test_al_table_of_nothing_is_an_error_and_no_round_0_means_no_area(tmp_path):
    with pytest.raises(ValueError, match="no al.sh results under"):
        report.al_table(str(tmp_path))
    os.makedirs(tmp_path / "s0" / "random" / "r1")
    with open(tmp_path / "s0" / "random" / "r1" / "result.json", "w") as fh:
        json.dump({"final_acc": 0.3, "labeled_counts": [5, 5]}, fh)
    md, _ = report.al_table(str(tmp_path))
    assert md.splitlines()[2].endswith("| not run |")  # the area needs round 0
