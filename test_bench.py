"""bench.py runs end to end and reports what it promises (a smoke test: no speed is asserted)."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_bench_writes_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--repeat", "1",
                        "--aug-batch", "16", "--steps", "1", "--arch", "wrn-10-1",
                        "--json", str(out)], capture_output=True, text=True, cwd=HERE, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    a = r["augmentation"]
    assert a["ours_strong_img_s"] > 0 and a["pil_strong_img_s"] > 0 and a["ratio"] > 0
    assert [l["rows"] for l in r["loss"]] == [10 + 64 + 2 * 448, 100 + 64 + 2 * 448]
    assert [t["k"] for t in r["train"]] == [10, 100]
    for t in r["train"]:
        assert t["steps_s"] > 0 and 0 < t["data_share"] < 1 and t["hours_262144_steps"] > 0
    assert "ratio" in p.stdout and "steps/s" in p.stdout
