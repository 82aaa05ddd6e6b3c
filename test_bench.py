"""bench.py runs end to end, writes every measurement it promises, and derives each ratio from
its own timings: with bench.timeit replaced by fixed times, every figure is the one those times give
(no real speed is asserted: the machine is shared)."""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def data_ops():
    import data
    return data.OPS


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--repeat", "1",
                        "--aug-batch", "16", "--steps", "1", "--arch", "wrn-10-1",
                        "--methods", "entropy fixmatch", "--json", str(out)],
                       capture_output=True, text=True, cwd=HERE, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(out.read_text()), p.stdout


def test_bench_json_structure(bench):
    r, stdout = bench
    assert set(r) >= {"device", "threads", "torch", "augmentation", "loss", "train"}
    a = r["augmentation"]
    assert set(a) == {"batch", "rounds", "ours_strong_img_s", "ours_weak_img_s", "pil_strong_img_s",
                      "ratio", "ratio_median_round", "ours_strong_cpu_img_s",
                      "pil_strong_cpu_img_s", "ratio_cpu"} and a["batch"] == 16
    ops = r["ops"]["ops"]  # every op but Identity against PIL, and the weak view and Cutout
    assert set(ops) == (set(data_ops()) - {"Identity"}) | {"weak", "cutout"}
    assert all(set(o) == {"ours_ms", "ours_cpu_ms", "pil_ms", "pil_cpu_ms", "ratio", "ratio_cpu"}
               for k, o in ops.items() if k not in ("weak", "cutout"))
    assert [l["rows"] for l in r["loss"]] == [10 + 64 + 2 * 448, 100 + 64 + 2 * 448]
    assert [(t["method"], t["k"]) for t in r["train"]] == [
        ("entropy", 10), ("entropy", 100), ("fixmatch", 10), ("fixmatch", 100)]
    assert [t["images"] for t in r["train"]] == [64 + 3 * 448] * 2 + [64 + 2 * 448] * 2
    assert "ratio" in stdout and "steps/s" in stdout


def fake_timings(monkeypatch, seconds):
    """bench.timed (and so bench.timeit) returns the given times, wall and thread CPU alike, in
    call order (without running anything)."""
    import bench
    left = list(seconds)

    def fake(fn, dev, repeat, warmup=1):
        t = left.pop(0)
        return t, t
    monkeypatch.setattr(bench, "timed", fake)
    return bench, left


def test_augmentation_ratio_is_pil_time_over_ours_from_the_fastest_rounds(monkeypatch):
    # rounds of (ours strong, ours weak, PIL): the fastest of each is kept, the ratio is PIL / ours
    bench, left = fake_timings(monkeypatch, [0.2, 0.05, 1.0, 0.1, 0.04, 3.0, 0.4, 0.08, 2.5])
    a = bench.bench_augmentation(torch.device("cpu"), 8, 3)
    assert not left
    assert a["ours_strong_img_s"] == pytest.approx(8 / 0.1)
    assert a["ours_weak_img_s"] == pytest.approx(8 / 0.04)
    assert a["pil_strong_img_s"] == pytest.approx(8 / 1.0)
    assert a["ratio"] == pytest.approx(1.0 / 0.1), "ratio is not min(PIL time) / min(our time)"
    assert a["ratio_median_round"] == pytest.approx(6.25)  # median of 5, 30, 6.25
    assert a["ratio_cpu"] == pytest.approx(1.0 / 0.1), "ratio_cpu is not min(PIL) / min(ours)"


def test_loss_and_train_figures_come_from_their_own_timings(monkeypatch, tmp_path):
    bench, left = fake_timings(monkeypatch, [0.004, 0.010, 0.006])
    r = bench.bench_loss(torch.device("cpu"), 10, 1)
    assert (r["plain_supcon_ms"], r["pair_weighted_ms"], r["anchor_weighted_ms"]) == \
        pytest.approx((4.0, 10.0, 6.0)) and r["pair_vs_plain"] == pytest.approx(2.5)
    bench, left = fake_timings(monkeypatch, [0.5, 0.1])  # one step, then one batch
    t = bench.bench_train(torch.device("cpu"), 10, 1, "wrn-10-1", False, str(tmp_path), "fixmatch")
    assert not left and t["images"] == 64 + 2 * 448
    assert (t["step_ms"], t["steps_s"], t["batch_ms"]) == pytest.approx((500.0, 2.0, 100.0))
    assert t["images_s"] == pytest.approx(2 * t["images"]) and t["data_share"] == pytest.approx(0.2)
    assert t["hours_262144_steps"] == pytest.approx(262144 * 0.5 / 3600)
