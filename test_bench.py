"""bench.py runs end to end, writes every measurement it promises, and derives each ratio from
its own timings (no speed is asserted: the machine is shared)."""
import json
import os
import subprocess
import sys

import pytest

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


def test_bench_ratios_come_from_its_own_timings(bench):
    r, _ = bench
    a = r["augmentation"]
    assert a["ratio"] == pytest.approx(a["ours_strong_img_s"] / a["pil_strong_img_s"], rel=1e-9)
    assert a["ratio_cpu"] == pytest.approx(a["ours_strong_cpu_img_s"] / a["pil_strong_cpu_img_s"])
    for o in r["ops"]["ops"].values():
        if "pil_ms" in o:
            assert o["ratio"] == pytest.approx(o["pil_ms"] / o["ours_ms"])
            assert o["ratio_cpu"] == pytest.approx(o["pil_cpu_ms"] / o["ours_cpu_ms"])
    for l in r["loss"]:
        assert l["pair_vs_plain"] == pytest.approx(l["pair_weighted_ms"] / l["plain_supcon_ms"])
    for t in r["train"]:
        assert t["steps_s"] == pytest.approx(1e3 / t["step_ms"])
        assert t["images_s"] == pytest.approx(t["images"] * t["steps_s"])
        assert t["data_share"] == pytest.approx(t["batch_ms"] / t["step_ms"])
        assert t["hours_262144_steps"] == pytest.approx(262144 / t["steps_s"] / 3600)
