"""One run across processes (torchrun, gloo on CPU, 2 ranks): the same loss, parameter update and
global batch as one process, exact resume, and the rules for batch sizes and world sizes.

BatchNorm: under torchrun on GPUs the model uses SyncBatchNorm; on CPU (gloo) each rank normalises
its own slice, so the equivalence check puts BN in eval mode (running statistics), where one
process and two ranks compute the same function."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
from conftest import tiny_args

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
METHODS = ["base", "entropy", "fixmatch", "ccssl", "simmatch", "semi"]

CHECK = """
import os, sys, torch
sys.path.insert(0, {here!r})
import config
import train
from conftest import drop, tiny_args
npz, out = sys.argv[1], sys.argv[2]
result = {{}}
for loss in {methods!r}:
    argv = drop(tiny_args(npz, out + "/" + loss, "--loss", loss, "--batch-size", "4", "--mu", "2"),
                *([] if loss == "entropy" else ["--entropy-ratio"]))
    run = train.Run(config.get_args(argv))
    for m in run.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()  # per-rank BN statistics would differ from the global ones on CPU
    seen, real = [], run.batch
    def batch():
        b = real()
        seen.append(b[0].clone())
        return b
    run.batch = batch
    losses = []
    for _ in range(3):
        before = run.stats[0].item()
        run.train_step()
        losses.append(run.stats[0].item() - before)
    result[loss] = {{"losses": losses, "x": seen, "sizes": run.view_sizes,
                    "params": {{k: v.clone() for k, v in run.model.state_dict().items()}},
                    "stats": run.stats.clone(), "state": run.method_state.state_dict()
                    if run.method_state else {{}}}}
torch.save(result, out + f"/result_rank{{run.rank}}.pt")
import ddp
ddp.close()
"""


def launch(n, args, **kw):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
           if n > 1 else [sys.executable])
    return subprocess.run(cmd + args, capture_output=True, text=True, env=ENV, cwd=HERE, **kw)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    from conftest import write_tiny_npz
    d = tmp_path_factory.mktemp("ddp")
    npz = write_tiny_npz(d / "tiny.npz")
    script = d / "check.py"
    script.write_text(CHECK.format(here=HERE, methods=METHODS))
    out = {}
    for n in (1, 2):
        (d / f"w{n}").mkdir()
        p = launch(n, [str(script), npz, str(d / f"w{n}")], timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        out[n] = [torch.load(d / f"w{n}" / f"result_rank{r}.pt", weights_only=True) for r in range(n)]
    return out


@pytest.mark.parametrize("loss", METHODS)
def test_two_ranks_give_the_single_process_loss_and_update(one_and_two, loss):
    one, two = one_and_two[1][0][loss], one_and_two[2][0][loss]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]),
                               rtol=1e-5, atol=1e-6)
    for k, v in one["params"].items():  # three SGD steps on the same global batches
        torch.testing.assert_close(two["params"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    torch.testing.assert_close(two["stats"][1:], one["stats"][1:])  # the global diagnostics
    torch.testing.assert_close(two["stats"][:1], one["stats"][:1], rtol=1e-5, atol=1e-6)  # loss sum
    for k, v in one["state"].items():  # SimMatch's / SeMi's state, from the gathered rows
        torch.testing.assert_close(two["state"][k], v, rtol=1e-4, atol=1e-6)


def test_the_ranks_together_see_exactly_the_single_process_batch(one_and_two):
    for loss in ("entropy", "fixmatch"):
        one = one_and_two[1][0][loss]
        ranks = [one_and_two[2][r][loss] for r in (0, 1)]
        for step in range(3):
            full = one["x"][step].split(one["sizes"])
            halves = [r["x"][step].split([s // 2 for s in one["sizes"]]) for r in ranks]
            for j, view in enumerate(full):  # indices and augmentation parameters alike
                assert torch.equal(torch.cat([halves[0][j], halves[1][j]]), view)


def gone_within(pid: int, seconds: float) -> bool:
    """True once process pid has ended (a zombie counts: it waits for init to reap it)."""
    for _ in range(int(seconds / 0.05) + 1):
        try:
            if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_kill_and_resume_two_ranks_is_bitwise_exact(tiny_npz, tmp_path):
    extra = ["--epochs", "3", "--steps-per-epoch", "4", "--save-every", "1"]
    args = lambda out: ["train.py", *tiny_args(tiny_npz, out, *extra)]  # noqa: E731
    p = launch(2, args(tmp_path / "ref"), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "deprecated" not in p.stderr  # all_gather's warning, once per rank, is silenced
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *args(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV, cwd=HERE, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 3/"):
                os.kill(proc.pid, signal.SIGKILL)  # the launcher only: the ranks die with it
                break
        proc.wait()
        rank0 = int((tmp_path / "killed" / ".lock").read_text())  # the lock's holder
        assert gone_within(rank0, 1.5), "rank 0 outlived the torchrun launcher"
        # a rank left running would hold the run directory's lock: the relaunch would be refused
        p = launch(2, args(tmp_path / "killed"), timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing left, unless the ranks outlived it
        except ProcessLookupError:
            pass
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    ref = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    got = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        for k in ref[part]:
            assert torch.equal(ref[part][k], got[part][k]), f"{part}.{k}"
    assert ref["history"] == got["history"] and got["world_size"] == 2
    one = launch(1, args(tmp_path / "killed"))  # another world size: refused, one line
    assert one.returncode != 0 and "trained with 2 process(es) and cannot resume with 1" in one.stderr


MAIN = """
import os, sys, torch
sys.path.insert(0, {here!r})
import ddp, train
argv = sys.argv[2:]
train.main(argv)
done = os.path.exists(argv[argv.index("--out") + 1] + "/result.json")
with open(sys.argv[1] + f"/rank{{ddp.world()[0]}}.txt", "w") as f:
    f.write(f"{{torch.distributed.is_initialized()}} {{done}}")
"""


def test_every_rank_leaves_train_after_rank_0_with_the_process_group_torn_down(tiny_npz, tmp_path):
    # with it alive, a rank's exit can abort in gloo's teardown ("terminate called without an
    # active exception") and torchrun then fails a finished run, about one run in ten; and no
    # rank leaves before rank 0 has written the result (the barrier before the teardown)
    script = tmp_path / "main.py"
    script.write_text(MAIN.format(here=HERE))
    p = launch(2, [str(script), str(tmp_path), *tiny_args(tiny_npz, tmp_path / "run")], timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["False True"] * 2
    assert "terminate called" not in p.stderr


def test_batch_sizes_must_divide_by_the_world_size(tiny_npz, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        config.get_args(tiny_args(tiny_npz, tmp_path / "r"))
    assert "must divide by the 3 processes" in capsys.readouterr().err
