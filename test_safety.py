"""Bad input and data safety, round 3: silent wrong results, files that go out of step, one writer
per run directory, drivers that fail late. Each test failed on the code before the fix."""
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import config
import data
import ddp
import evaluate
import query
import report
import train
from conftest import drop, lt_args, tiny_args, write_tiny_npz

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def one_line_exit(call, capsys=None) -> str:
    """The SystemExit message of call (or, for argparse, its last stderr line): one line."""
    with pytest.raises(SystemExit) as e:
        call()
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip()
    assert "Traceback" not in msg, msg
    return msg if isinstance(e.value.code, str) else msg.splitlines()[-1]


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (which Python's json writes by default)."""
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """One finished tiny run (shared, read-only: copy it before changing it)."""
    d = tmp_path_factory.mktemp("done")
    npz = write_tiny_npz(d / "tiny.npz")
    train.main(tiny_args(npz, d / "run"))
    return npz, d / "run"


def copy_run(done_run, tmp_path):
    npz, run = done_run
    shutil.copytree(run, tmp_path / "run")
    return npz, tmp_path / "run"


# ---------------------------------------------------------------- silent wrong results

def test_logit_adjustment_with_a_class_without_labels_is_undefined():
    scores = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    y = torch.arange(30) % 3
    m = evaluate.eval_metrics(scores, y, [5, 0, 3], tau=1.0)
    assert m["test_acc_adjusted"] is None and m["per_class_acc_adjusted"] == [None] * 3
    assert m["head_acc_adjusted"] is None and m["tail_acc_adjusted"] is None
    assert m["test_acc"] == (scores.argmax(1) == y).double().mean().item()  # raw: unchanged
    m0 = evaluate.eval_metrics(scores, y, [5, 0, 3], tau=0.0)  # tau 0: no adjustment at all
    assert m0["test_acc_adjusted"] == m0["test_acc"]
    m1 = evaluate.eval_metrics(scores, y, [5, 1, 3], tau=1.0)  # every class labeled: defined
    assert m1["test_acc_adjusted"] is not None


def float_flag_argv(npz, out, dest):
    """Arguments under which float flag DEST applies (its method, the long-tailed split)."""
    argv = tiny_args(npz, out)
    owners = __import__("methods").FLAGS.get(dest, (None, ("entropy",)))[1]
    if "entropy" not in owners:
        argv = drop(argv, "--entropy-ratio") + ["--loss", owners[0], "--epochs", "7"]
    if dest.startswith("imb_ratio"):
        argv = lt_args(npz, out, *argv[argv.index("--out") + 2:])
    return argv


def test_every_float_flag_refuses_non_finite_values(tiny_npz, tmp_path, capsys):
    floats = [a for a in config.make_parser()._actions if a.type is float]
    assert len(floats) >= 20
    for action in floats:
        flag = action.option_strings[0]
        argv = float_flag_argv(tiny_npz, tmp_path / "r", action.dest)
        for v in ("nan", "inf", "-inf"):
            msg = one_line_exit(lambda: config.get_args(argv + [flag, v]), capsys)
            assert flag in msg, (flag, v, msg)
    assert "--logit-adjust" in one_line_exit(
        lambda: config.get_args(tiny_args(tiny_npz, tmp_path / "r", "--logit-adjust", "-5")), capsys)
    config.get_args(lt_args(tiny_npz, tmp_path / "r", "--logit-adjust", "0"))  # 0 is fine


def test_no_non_finite_number_reaches_a_json_file(tiny_npz, tmp_path, monkeypatch):
    real = train.eval_metrics
    monkeypatch.setattr(train, "eval_metrics",
                        lambda *a, **k: {**real(*a, **k), "test_acc_adjusted": math.nan})
    train.main(tiny_args(tiny_npz, tmp_path / "r"))
    res = strict_json((tmp_path / "r" / "result.json").read_text())
    assert res["final"]["test_acc_adjusted"] is None
    for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines():
        assert strict_json(line)["test_acc_adjusted"] is None
    assert checkpoint.dumps_json({"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}}) == \
        '{"a": null, "b": [null, 1.5], "c": {"d": null}}'


def test_logit_adjust_is_part_of_the_resume_check(done_run, tmp_path):
    npz, run = copy_run(done_run, tmp_path)
    with pytest.raises(SystemExit, match="logit_adjust: checkpoint 1.0, now 0.5"):
        train.main(tiny_args(npz, run, "--logit-adjust", "0.5"))
    state = torch.load(run / "last.pt", weights_only=True)
    del state["args"]["logit_adjust"]  # a checkpoint from before the flag: it used 1.0
    torch.save(state, run / "last.pt")
    assert train.main(tiny_args(npz, run))["args"]["logit_adjust"] == 1.0


def test_every_flag_is_in_the_resume_check_or_documented_free():
    dests = {a.dest for a in config.make_parser()._actions if a.dest != "help"}
    dests = (dests - {"labeled_idx"}) | {"labeled_idx_sha256"}  # the file is checked by content
    unclassified = dests - set(checkpoint.CONFIG_KEYS) - set(checkpoint.FREE_ON_RESUME)
    assert not unclassified, f"add these to CONFIG_KEYS or FREE_ON_RESUME: {unclassified}"
    assert not set(checkpoint.CONFIG_KEYS) & set(checkpoint.FREE_ON_RESUME)
    doc = open(os.path.join(HERE, "docs", "reliability.md")).read()
    for k in checkpoint.FREE_ON_RESUME:
        if k != "debug_nan_step":
            assert f"--{k.replace('_', '-')}" in doc, k


def test_hard_weight_without_effect_is_refused(tiny_npz, tmp_path, capsys):
    argv = drop(tiny_args(tiny_npz, tmp_path / "r", "--loss", "fixmatch", "--hard-weight", "0.75"),
                "--entropy-ratio")
    assert "--hard-weight 0.75 has no effect with --epochs 5" in one_line_exit(
        lambda: config.get_args(argv + ["--epochs", "5"]), capsys)
    config.get_args(argv + ["--epochs", "6"])
    config.get_args(drop(argv, "--hard-weight") + ["--hard-weight", "0", "--epochs", "2"])


def test_active_learning_on_a_long_tailed_run_is_refused(tmp_path, monkeypatch):
    from test_query import IndexModel, fake_run, index_dataset
    y = index_dataset(tmp_path / "idx.npz")
    monkeypatch.setattr(query, "load_run_model", lambda state, k, dev: IndexModel())
    run = fake_run(tmp_path, y, np.arange(0, 30), np.arange(30, 100))
    state = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    state["args"]["lt_labeled"] = 10
    torch.save(state, os.path.join(run, "last.pt"))
    msg = one_line_exit(lambda: query.main([run, "--n", "5", "--strategy", "entropy", "--device",
                                            "cpu", "--out", str(tmp_path / "r1.txt")]))
    assert "long-tailed run" in msg and "70 chosen images" in msg
    assert not (tmp_path / "r1.txt").exists()


def write_result(folder, acc, **args):
    base = {"dataset": "cifar10", "labels_per_class": 4, "loss": "entropy", "seed": 0,
            **report.PROTOCOL}
    os.makedirs(folder, exist_ok=True)
    r = {"final_acc": acc, "median_last20_acc": acc, "args": {**base, **args},
         "final": {"test_acc": acc, "test_acc_adjusted": acc}}
    with open(os.path.join(folder, "result.json"), "w") as fh:
        json.dump(r, fh)


def test_a_copied_run_counts_once(tmp_path, capsys):
    write_result(tmp_path / "base0", 0.90)
    shutil.copytree(tmp_path / "base0", tmp_path / "base0_backup")
    write_result(tmp_path / "base1", 0.92, seed=1)
    md = report.table1(str(tmp_path))
    assert "91.00 ± 1.41 (2 seeds)" in md
    err = capsys.readouterr().err
    assert "base0_backup" in err and "counted once" in err


LT = {"lt_labeled": 1500, "lt_unlabeled": 3000, "imb_ratio_l": 100.0, "imb_ratio_u": 100.0,
      "labels_per_class": None, "mu": 2}


def test_lt_table_shows_the_settings_that_differ(tmp_path, capsys):
    write_result(tmp_path / "a", 0.5, loss="fixmatch", **LT)
    write_result(tmp_path / "b", 0.6, loss="fixmatch", **dict(LT, lr=0.01))
    write_result(tmp_path / "c", 0.7, loss="base", **LT)
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "result.json").write_text("{")
    md = report.lt_table(str(tmp_path))
    rows = [l for l in md.splitlines() if l.startswith("| cifar10 ")]
    assert len(rows) == 3 and len({r.split(" | ")[2] for r in rows}) == 3, rows
    assert any("fixmatch --lr 0.01" in r for r in rows) and any("| base |" in r for r in rows)
    assert capsys.readouterr().err.count("warning: skipping") == 1  # once, not once per column


def test_empty_results_folder_is_an_error_for_every_table(tmp_path, capsys):
    for flag in ("--table", "--lt-table", "--al-table"):
        msg = one_line_exit(lambda: evaluate.main([flag, str(tmp_path)]))
        assert str(tmp_path) in msg and msg.startswith("evaluate.py: error: no "), msg
    assert not list(tmp_path.glob("*.md"))


def fake_plot_run(folder, mu_confident=False):
    os.makedirs(folder)
    lines = [{"step": s, "epoch": s, "test_acc": 0.1 * s, "confident": 0.0, "entropy_selected": 0.0,
              "unconfident": 1.0, "pl_acc_confident": None, "pl_acc_selected": None,
              "mean_weight": 0.2} for s in (1, 2)]
    with open(os.path.join(folder, "metrics.jsonl"), "w") as fh:
        fh.write("".join(json.dumps(m) + "\n" for m in lines))
    with open(os.path.join(folder, "result.json"), "w") as fh:
        json.dump({"args": {"loss": "base", "dataset": "cifar10", "mu": 7}}, fh)
    return str(folder)


def test_plot_writes_the_format_its_suffix_names(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    run = fake_plot_run(tmp_path / "run")
    magic = {"pdf": b"%PDF", "svg": b"<?xml", "jpg": b"\xff\xd8"}  # png: the other tests
    for ext, head in magic.items():
        evaluate.main(["--plot", run, "--out", str(tmp_path / f"f.{ext}")])
        assert (tmp_path / f"f.{ext}").read_bytes()[:len(head)] == head, ext
    for bad in ("f.foo", "f", str(tmp_path / "missing" / "f.png")):
        msg = one_line_exit(lambda: evaluate.main(["--plot", run, "--out", bad]))
        assert msg.startswith("evaluate.py: error: --out"), msg
    monkeypatch.setattr(report, "atomic_write", lambda *a: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    assert "Permission denied" in one_line_exit(
        lambda: evaluate.main(["--plot", run, "--out", str(tmp_path / "g.png")]))


def test_plot_says_why_a_panel_is_empty(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    texts = []
    monkeypatch.setattr(report, "save_figure", lambda fig, out: texts.extend(
        t.get_text() for ax in fig.axes for t in ax.texts))
    report.plot_runs([fake_plot_run(tmp_path / "run")], str(tmp_path / "f.png"))
    assert len(texts) == 1 and "confident or entropy-selected" in texts[0]


def test_tables_into_an_unwritable_folder_are_one_line(tmp_path, monkeypatch):
    write_result(tmp_path / "a", 0.5)
    monkeypatch.setattr(evaluate, "write_text", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    msg = one_line_exit(lambda: evaluate.main(["--table", str(tmp_path)]))
    assert "Permission denied" in msg and "table1.md" in msg


# ---------------------------------------------------------------- lost or inconsistent files

def test_a_finished_run_is_never_overwritten(done_run, tmp_path):
    npz, run = copy_run(done_run, tmp_path)
    before = {n: (run / n).read_bytes() for n in ("result.json", "metrics.jsonl")}
    for n in checkpoint.CKPT_NAMES:
        (run / n).unlink()
    msg = one_line_exit(lambda: train.main(tiny_args(npz, run)))
    assert "holds a finished run" in msg and f"delete {run}" in msg
    assert {n: (run / n).read_bytes() for n in before} == before


def test_a_resumed_run_removes_the_temporary_files_of_a_killed_one(done_run, tmp_path):
    npz, run = copy_run(done_run, tmp_path)
    for name in ("metrics.jsonl.tmp-99999", "result.json.tmp-99998", "last.pt.tmp"):
        (run / name).write_text("left by a kill -9")
    train.main(tiny_args(npz, run))
    assert not list(run.glob("*.tmp*"))


def test_make_subset_refuses_to_replace_its_input(tmp_path, capsys):
    src = write_tiny_npz(tmp_path / "src.npz")
    before = open(src, "rb").read()
    os.symlink(src, tmp_path / "link.npz")
    for out in (src, str(tmp_path / "link.npz"), str(tmp_path / "." / "src.npz")):
        msg = one_line_exit(lambda: data.main(["make-subset", "--dataset", f"npz:{src}", "--out", out,
                                               "--per-class-train", "2", "--per-class-test", "2"]),
                            capsys)
        assert "is the input dataset" in msg
    assert open(src, "rb").read() == before
    data.main(["make-subset", "--dataset", f"npz:{src}", "--out", str(tmp_path / "sub.npz"),
               "--per-class-train", "2", "--per-class-test", "2"])


@pytest.fixture
def index_run(tmp_path, monkeypatch):
    from test_query import IndexModel, fake_run, index_dataset
    y = index_dataset(tmp_path / "idx.npz")
    monkeypatch.setattr(query, "load_run_model", lambda state, k, dev: IndexModel())
    return fake_run(tmp_path, y, np.arange(0, 300, 10))


def test_query_files_share_an_id_and_never_describe_two_queries(index_run, tmp_path, monkeypatch):
    out = tmp_path / "r1.txt"
    (tmp_path / "r1.txt.tmp-99999").write_text("left by a killed query")
    (tmp_path / "r1.csv.tmp-99998").write_text("left by a killed query")
    argv = [index_run, "--n", "5", "--device", "cpu", "--out", str(out)]
    query.main(argv + ["--strategy", "entropy"])
    qid = query.check_query_files(str(out))
    assert json.load(open(tmp_path / "r1.json"))["query_id"] == qid
    assert open(out).readline() == f"# query {qid}\n"
    assert not list(tmp_path.glob("*.tmp-*"))  # cleaned up
    assert len(data.read_index_file(str(out))) == 35  # train.py reads it as before
    real = query.write_text
    monkeypatch.setattr(query, "write_text", lambda p, t, **k: (_ for _ in ()).throw(
        OSError(28, "No space left on device")) if p.endswith(".json") else real(p, t, **k))
    with pytest.raises(SystemExit):
        query.main(argv + ["--strategy", "margin"])  # dies after the .csv, before the .json
    assert not out.exists()  # no .txt of the old query beside the new .csv: redone next time
    monkeypatch.setattr(query, "write_text", real)
    query.main(argv + ["--strategy", "margin"])
    assert query.check_query_files(str(out)) != qid
    query.main(argv[:-1] + [str(tmp_path / "r1.npy"), "--strategy", "margin"])
    query.check_query_files(str(tmp_path / "r1.npy"))


HOLD = """import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)  # as checkpoint.DirLock
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("locked", flush=True)
time.sleep(60)
"""


def hold_lock(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)],
                         stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_one_writer_per_run_directory_and_no_stale_lock(tiny_npz, tmp_path, index_run):
    out = tmp_path / "r"
    out.mkdir()
    holder = hold_lock(out)
    try:
        msg = one_line_exit(lambda: train.main(tiny_args(tiny_npz, out)))
        assert f"in use by another process (pid {holder.pid})" in msg
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    train.main(tiny_args(tiny_npz, out))  # the lock died with its holder: no stale lock
    (tmp_path / "q").mkdir()
    holder = hold_lock(tmp_path / "q")
    try:
        msg = one_line_exit(lambda: query.main([index_run, "--n", "2", "--strategy", "entropy",
                                                "--device", "cpu", "--out",
                                                str(tmp_path / "q" / "r1.txt")]))
        assert f"pid {holder.pid}" in msg
        write_result(tmp_path / "q" / "a", 0.5)
        assert f"pid {holder.pid}" in one_line_exit(
            lambda: evaluate.main(["--table", str(tmp_path / "q")]))
    finally:
        holder.kill()
        holder.wait()


def test_a_failed_start_leaves_no_lock_file_behind(tiny_npz, tmp_path):
    out = tmp_path / "new" / "r"
    with pytest.raises(SystemExit):
        train.main(tiny_args(tiny_npz, out, "--labels-per-class", "99"))
    assert not (tmp_path / "new").exists()


CHILD = """import os, sys, time
sys.path.insert(0, {here!r})
import ddp
ddp.die_with_parent()
print(os.getpid(), flush=True)
time.sleep(60)
"""
PARENT = """import subprocess, sys, time
c = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux-only")
def test_workers_die_with_their_launcher(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD.format(here=HERE)],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        try:
            if open(f"/proc/{child}/stat").read().split()[2] == "Z":
                return  # dead, waiting for init to reap it
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the worker outlived its launcher")


def test_ddp_init_sets_the_parent_death_signal_and_quiets_all_gather(monkeypatch):
    import torch.distributed as dist
    calls = []
    monkeypatch.setattr(ddp, "die_with_parent", lambda: calls.append(1))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp.init("cpu")
        warnings.warn("torch.distributed.nn.functional.all_gather is deprecated, use x instead.",
                      FutureWarning)
    assert calls == [1] and not caught


# ---------------------------------------------------------------- tracebacks, misleading messages

def test_a_dataset_or_metrics_file_instead_of_a_run_is_named(done_run, tmp_path):
    npz, run = done_run
    cases = [(npz, "a dataset"), (str(run / "metrics.jsonl"), "a metrics file"),
             (str(run / "result.json"), "a JSON file")]
    for path, what in cases:
        for call in (lambda: evaluate.main([path]),
                     lambda: query.main([path, "--n", "1", "--strategy", "entropy",
                                         "--out", str(tmp_path / "n.txt"), "--device", "cpu"])):
            msg = one_line_exit(call)
            assert what in msg and "delete" not in msg and "expected a run directory" in msg, msg


def test_evaluate_a_smaller_dataset_or_a_bare_state_dict_is_one_line(done_run, tmp_path):
    npz, run = done_run
    small = write_tiny_npz(tmp_path / "small.npz", n_train=3)
    msg = one_line_exit(lambda: evaluate.main([str(run), "--dataset", f"npz:{small}"]))
    assert "fewer than the run" in msg and "--dataset" in msg
    torch.save(torch.load(run / "last.pt", weights_only=True)["ema"], tmp_path / "ema.pt")
    msg = one_line_exit(lambda: evaluate.main([str(tmp_path / "ema.pt")]))
    assert "not a checkpoint of train.py" in msg and "state_dict" in msg


def test_plot_confusion_takes_the_moved_dataset(done_run, tmp_path):
    pytest.importorskip("matplotlib")
    npz, run = copy_run(done_run, tmp_path)
    state = torch.load(run / "last.pt", weights_only=True)
    state["args"]["dataset"] = f"npz:{tmp_path / 'gone.npz'}"
    torch.save(state, run / "last.pt")
    evaluate.main(["--plot-confusion", str(run), "--dataset", f"npz:{npz}", "--device", "cpu",
                   "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_lt_unlabeled_0_names_the_flag(tiny_npz, tmp_path, capsys):
    msg = one_line_exit(lambda: config.get_args(lt_args(tiny_npz, tmp_path / "r",
                                                        "--lt-unlabeled", "0")), capsys)
    assert "error: --lt-unlabeled (M1" in msg and "got 0" in msg


def test_labeled_idx_content_error_without_the_usage_block(tiny_npz, tmp_path, capsys):
    (tmp_path / "bad.txt").write_text("1\nx\n")
    argv = drop(tiny_args(tiny_npz, tmp_path / "r"), "--labels-per-class")
    with pytest.raises(SystemExit):
        config.get_args(argv + ["--labeled-idx", str(tmp_path / "bad.txt")])
    err = capsys.readouterr().err
    assert "usage:" not in err and err.strip().count("\n") == 0 and "line 2" in err


def test_index_file_with_a_byte_order_mark_is_read(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeff3\n1\n".encode("utf-8"))
    assert data.read_index_file(str(tmp_path / "bom.txt")).tolist() == [1, 3]


def test_one_based_labels_get_a_hint(tmp_path):
    x = np.zeros((12, 8, 8, 3), np.uint8)
    y = np.arange(12) % 3 + 1
    np.savez(tmp_path / "one.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    msg = one_line_exit(lambda: train.main(tiny_args(tmp_path / "one.npz", tmp_path / "r")))
    assert "class 0 has 0" in msg and "1-based" in msg


def test_query_and_data_help_show_defaults(capsys):
    for main in (query.main, data.main):
        with pytest.raises(SystemExit):
            main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 50)" in out and "(default: 500)" in out and "(default: auto)" in out


def test_img_s_after_an_evaluation_counts_training_time_only(tiny_npz, tmp_path, monkeypatch,
                                                             capsys):
    real, slow = train.Run.evaluate, []

    def evaluate_slowly(self):
        if not slow:
            slow.append(time.sleep(1.5))
        return real(self)
    monkeypatch.setattr(train.Run, "evaluate", evaluate_slowly)
    train.main(tiny_args(tiny_npz, tmp_path / "r"))
    rate = {int(l.split()[1].split("/")[0]): float(l.split("| ")[1].split()[0])
            for l in capsys.readouterr().out.splitlines() if l.startswith("step ")}
    assert rate[4] > 0.2 * min(rate[2], rate[3]), rate  # step 4 comes right after the eval at 3


# ---------------------------------------------------------------- drivers

STUB = """#!/usr/bin/env bash
# stands in for python: records train.py calls (and where they ran), does nothing for query.py
# and evaluate.py; the rest (the drivers' checks) is real
case $1 in
  */train.py|train.py) echo "$PWD $*" >> "$RECORD"; exit 0;;
  */query.py|query.py|*/evaluate.py|evaluate.py) exit 0;;
esac
exec "$REAL_PYTHON" "$@"
"""


def driver(tmp_path, script, cwd=None, timeout=60, **env):
    stub = tmp_path / "stub"
    if not stub.exists():
        stub.write_text(STUB)
        stub.chmod(0o755)
    e = {**ENV, "PYTHON": str(stub), "REAL_PYTHON": sys.executable,
         "RECORD": str(tmp_path / "record"), "EPOCHS": "1", **env}
    return subprocess.run(["bash", os.path.join(HERE, script)], capture_output=True, text=True,
                          env=e, cwd=cwd or tmp_path, timeout=timeout)


def trained(tmp_path):
    rec = tmp_path / "record"
    return rec.read_text().splitlines() if rec.exists() else []


@pytest.mark.parametrize("script", ["run_all.sh", "run_lt.sh"])
def test_a_typo_in_a_driver_setting_fails_before_anything_trains(tmp_path, script):
    bad = [{"METHODS": "base entopy"}, {"SEEDS": "0 x"}, {"EPOCHS": "1e3"}, {"DRY_RUN": "yes"},
           {"EXTRA_ARGS": "--epochs 5"}, {"EXTRA_ARGS": "--data-d x"}, {"EXTRA_ARGS": "--out=x"},
           {"GPUS": " "}, {"GPUS": "0;1"}, {"METHODS": " "}, {"SEEDS": "0 1 00"},
           {"METHODS": "base base"}]
    if script == "run_lt.sh":
        bad += [{"HARD_WEIGHT": "0.7.5"}, {"ENTROPY_RATIO": "0"}, {"MU": "-1"},
                {"HARD_WEIGHT": "0.75", "EPOCHS": "5"}]
    for env in bad:
        p = driver(tmp_path, script, timeout=30, **env)
        assert p.returncode == 2 and p.stderr.count("\n") == 1, (env, p.stderr, p.stdout)
        assert p.stderr.startswith(f"{script}: ") and not p.stdout, (env, p.stderr)
        assert not trained(tmp_path), env
    assert "'entopy'" in driver(tmp_path, script, METHODS="base entopy").stderr


def test_gpus_accepts_commas_and_spaces(tmp_path):
    for gpus in ("0,1", "0, 1", " 0  1 ", "0\t1"):
        p = driver(tmp_path, "run_all.sh", GPUS=gpus, DRY_RUN="1")
        assert p.returncode == 0, p.stderr
        assert [l.split()[0] for l in p.stdout.splitlines()[:4]] == \
            ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"] * 2, (gpus, p.stdout)


@pytest.mark.parametrize("script", ["run_all.sh", "run_lt.sh", "al.sh"])
def test_drivers_take_paths_from_the_callers_directory(tmp_path, script):
    caller = tmp_path / "caller"
    caller.mkdir()
    env = {"OUT_DIR": "res", "DATA_DIR": "d", "SEEDS": "0"}
    if script == "al.sh":
        env.update(ROUNDS="1", STRATEGIES="random", INIT="4", N_QUERY="2")
    p = driver(tmp_path, script, cwd=caller, DRY_RUN="1", **env)
    assert p.returncode == 0, p.stderr
    for line in p.stdout.splitlines():
        cmd = shlex.split(line)
        assert os.path.isfile(os.path.join(caller, cmd[1])), line  # works where it is printed
        if "--out" in cmd and cmd[1].endswith("train.py"):
            assert cmd[cmd.index("--out") + 1].startswith("res/") and "d" in cmd
    if script != "al.sh":
        p = driver(tmp_path, script, cwd=caller, METHODS="base", **env)
        runs = trained(tmp_path)
        assert runs and all(r.split()[0] == str(caller) for r in runs), runs


def test_al_sh_normalises_extra_args_and_refuses_its_own_flags(tmp_path):
    env = {"OUT_DIR": "al", "ROUNDS": "1", "STRATEGIES": "random", "ENTROPY_RATIO": "0.5"}
    (tmp_path / "al").mkdir()
    conf = ("INIT=4 N_QUERY=40 DATASET=cifar10 LOSS=entropy ENTROPY_RATIO=0.5 "
            "EXTRA_ARGS=--epochs 5 --arch wrn-10-1 QUERY_ARGS=--device cpu")
    (tmp_path / "al" / "al_settings.txt").write_text(conf + "\n")
    for extra, qargs in (("--epochs 5 --arch wrn-10-1", "--device cpu"),
                         ("  --epochs   5 --arch\twrn-10-1 ", " --device  cpu")):
        p = driver(tmp_path, "al.sh", EXTRA_ARGS=extra, QUERY_ARGS=qargs, SEEDS="9", **env)
        assert "other settings" not in p.stderr, (extra, p.stderr)
    for extra, qargs in (("--labels-per-class 3", ""), ("--labels 3", ""), ("--seed=1", ""),
                         ("", "--n 5"), ("", "--strategy=entropy"), ("--loss base", "")):
        p = driver(tmp_path, "al.sh", EXTRA_ARGS=extra, QUERY_ARGS=qargs, **env)
        assert p.returncode == 2 and "al.sh sets it itself" in p.stderr, (extra, qargs, p.stderr)
    assert driver(tmp_path, "al.sh", LOSS="entopy", **env).returncode == 2


def test_the_drivers_read_the_method_names_from_methods_py():
    import methods
    p = subprocess.run(["bash", "-c", f'DRIVER=t HERE={shlex.quote(HERE)} PYTHON={sys.executable} '
                        f'&& . {shlex.quote(os.path.join(HERE, "checks.sh"))} && methods_list'],
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == list(methods.STEPS), p.stderr
