"""The prepared check of a machine's training path (docs/speed.md, "The check"): run it first on a
new GPU. It proves the CUDA path or names what is wrong, and records the speed.

    python bench.py --check                          # every local GPU; the reduced form on CPU
    python bench.py --check --dataset cifar10        # the short run on your CIFAR-10
    python bench.py --check --device cpu --no-compile   # the CPU form, as CI runs it

Checks (each one line in the summary; exit status 0 only if none failed):
  equivalence   per method, one training step on the same batch and weights: loss and gradient
                norm on the device in fp32 vs on the CPU in fp32; bf16 autocast (and on CUDA fp16
                with the GradScaler) vs fp32 loss; --compile vs eager loss
  augmentation  every op, flip / translate and the Cutout box on the device vs the CPU on the
                same given parameters (CPU and CUDA generators draw different numbers)
  speed         bench.py's step for every method at the paper's batch, eager and compiled:
                steps/s, peak memory, hours per Table 1 cell, the gap to 73 steps/s
  resume        a short train.py run killed (SIGKILL) in the middle and resumed vs the same run
                uninterrupted, under torch.use_deterministic_algorithms
  torchrun      a few steps under torchrun on every local GPU (nccl, SyncBatchNorm) vs one process
                on the same global batch
On CPU everything runs at tiny sizes (wrn-10-1, 16 x 16 images, a few steps, one gloo process),
and "device" is the CPU: the check then proves the machinery, not a GPU.
"""
import argparse
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_STEPS_S = 73.0  # a Table 1 cell (262,144 steps) in one hour on one H100
# Tolerances (relative). fp32 on two devices sums in different orders: about 1e-6 per
# reduction, amplified through 28 layers and BatchNorm, so 1e-3 on the loss and 1e-2 on the
# gradient norm still catch any wiring error (a wrong view, temperature or mask moves the loss by
# per cent). bf16 keeps 8 mantissa bits (0.4 % per rounding): 5e-2 on the loss.
TOL = {"fp32_loss": 1e-3, "fp32_grad_norm": 1e-2, "amp_loss": 5e-2, "compile_loss": 1e-3,
       "torchrun_loss": 1e-3, "resume_param": 1e-3}
METHODS = ["base", "entropy", "fixmatch", "ccssl", "simmatch"]
# the two forms: GPU at the paper's sizes, CPU tiny (CI runs it in well under a minute)
FORMS = {"gpu": dict(arch="wrn-28-2", batch=64, mu=7, images=4096, size=32, k=10, lpc=4,
                     speed_steps=30, run_steps=200, kill_at=130, save_every=25, log_every=10,
                     torchrun_steps=3),
         "cpu": dict(arch="wrn-10-1", batch=4, mu=2, images=60, size=16, k=3, lpc=2,
                     speed_steps=1, run_steps=6, kill_at=4, save_every=2, log_every=1,
                     torchrun_steps=2)}
# a train.py launch for the resume check: deterministic kernels, no cuDNN autotuning (it may pick
# another algorithm in the resumed process)
DETERMINISTIC_TRAIN = """
import sys, torch
torch.use_deterministic_algorithms(True, warn_only=True)
sys.path.insert(0, {here!r})
import train
init = train.Run.__init__
def no_autotune(self, args):
    init(self, args)
    torch.backends.cudnn.benchmark = False
train.Run.__init__ = no_autotune
train.main(sys.argv[1:])
"""


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@contextlib.contextmanager
def exact_fp32():
    """fp32 means fp32 on CUDA too: no TF32 in convolutions and matrix products (restored after,
    so that the speed check times the defaults training runs with)."""
    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was


# ---------------------------------------------------------------- the runs the checks use

def write_synthetic(path: str, c: dict) -> str:
    import bench
    rng = np.random.default_rng(0)
    np.savez(path, x_train=bench.synthetic_images(c["images"], size=c["size"]),
             y_train=np.arange(c["images"]) % c["k"],
             x_test=bench.synthetic_images(max(64, c["images"] // 16), seed=1, size=c["size"]),
             y_test=rng.integers(0, c["k"], max(64, c["images"] // 16)))
    return f"npz:{path}"


def train_argv(c: dict, dataset: str, method: str, device: str, out: str, *extra: str) -> list:
    argv = ["--dataset", dataset, "--data-dir", c["data_dir"], "--labels-per-class",
            str(c["lpc"]), "--arch", c["arch"],
            "--batch-size", str(c["batch"]), "--mu", str(c["mu"]), "--loss", method,
            "--device", device, "--out", out, *extra]
    if method == "entropy" and dataset.startswith("npz:"):  # beta has a default for CIFAR only
        argv += ["--entropy-ratio", "0.2"]
    return argv


def make_run(argv: list):
    import config
    import train
    return train.Run(config.get_args(argv))


def step_on(run, batch: tuple, view_sizes: list) -> dict:
    """Run.train_step on a given batch: its loss, and the gradient norm the optimiser saw (after
    the GradScaler's unscale; none when it skipped the step)."""
    dev = run.dev
    run.batch = lambda: tuple(t.to(dev) if torch.is_tensor(t) else t for t in batch)
    run.view_sizes = view_sizes
    norms = []

    def grad_norm(opt, *_):
        gs = [p.grad for grp in opt.param_groups for p in grp["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in gs])).item())

    hook = run.opt.register_step_pre_hook(grad_norm)
    before = run.stats[0].item()
    run.train_step()
    hook.remove()
    return {"loss": run.stats[0].item() - before, "grad_norm": norms[0] if norms else None}


def check_equivalence(c: dict, dataset: str, dev: torch.device, tmp: str, compile_: bool) -> dict:
    """Per method: the CPU fp32 step and the device fp32 / autocast / compiled steps on one
    batch (drawn on the CPU) from the same initial weights and method state."""
    with exact_fp32():
        return _equivalence(c, dataset, dev, tmp, compile_)


def _equivalence(c: dict, dataset: str, dev: torch.device, tmp: str, compile_: bool) -> dict:
    res, bad = {}, []
    for m in METHODS:
        ref_run = make_run(train_argv(c, dataset, m, "cpu", f"{tmp}/eq_{m}_cpu", "--no-amp"))
        batch = ref_run.batch()
        sizes = ref_run.view_sizes
        variants = [("fp32", ["--no-amp"], None), ("amp", ["--amp"], None)]
        if dev.type == "cuda":
            variants.append(("fp16_scaler", ["--amp"], torch.float16))
        if compile_ and m == "entropy":  # one method: compiling is slow, the speed check
            # compiles every method again (in the precision training uses)
            variants.append(("compiled", ["--no-amp", "--compile"], None))
        runs = {}
        for name, flags, force in variants:
            r = make_run(train_argv(c, dataset, m, str(dev), f"{tmp}/eq_{m}_{name}", *flags))
            if force is not None:  # the fp16 + GradScaler path of GPUs without native bf16
                r.amp_dtype = force
                r.scaler = torch.amp.GradScaler("cuda", enabled=True)
            if ref_run.method_state is not None:
                r.method_state.load_state_dict(ref_run.method_state.state_dict())
            runs[name] = r
        out = {"cpu_fp32": step_on(ref_run, batch, sizes)}
        out.update({name: step_on(r, batch, sizes) for name, r in runs.items()})
        ref, fp32 = out["cpu_fp32"], out["fp32"]
        tests = [("fp32 loss vs CPU", rel(fp32["loss"], ref["loss"]), TOL["fp32_loss"]),
                 ("fp32 grad norm vs CPU", rel(fp32["grad_norm"], ref["grad_norm"]),
                  TOL["fp32_grad_norm"]),
                 ("amp loss vs fp32", rel(out["amp"]["loss"], fp32["loss"]), TOL["amp_loss"])]
        if "fp16_scaler" in out:
            tests.append(("fp16 + GradScaler loss vs fp32",
                          rel(out["fp16_scaler"]["loss"], fp32["loss"]), TOL["amp_loss"]))
        if "compiled" in out:
            tests.append(("compiled loss vs eager", rel(out["compiled"]["loss"], fp32["loss"]),
                          TOL["compile_loss"]))
        for what, err, tol in tests:
            if not err <= tol:  # also catches nan
                bad.append(f"{m}: {what} differs by {err:.2e} (tolerance {tol:.0e})")
        out["relative_errors"] = {what: err for what, err, _ in tests}
        res[m] = out
    def worst(kind):
        return max(e for r in res.values() for w, e in r["relative_errors"].items() if kind in w)
    return {"ok": not bad, "methods": res, "detail": "; ".join(bad) if bad else
            f"{len(METHODS)} methods; largest relative differences: fp32 vs CPU "
            f"{max(worst('fp32 loss'), worst('fp32 grad')):.1e}, "
            f"autocast vs fp32 {worst('amp'):.1e}"
            + (f", fp16 + GradScaler {worst('fp16'):.1e}" if dev.type == "cuda" else "")
            + (f", compiled vs eager {worst('compiled'):.1e}" if compile_ else "")}


def check_augmentation(c: dict, dev: torch.device) -> dict:
    """The batched ops on the device (the whole-batch path CUDA uses) vs the CPU's per-op slices,
    on parameters drawn on the CPU: every op, flip + translate, the Cutout box."""
    import data
    g = torch.Generator().manual_seed(0)
    n = 14 * 32
    x = torch.randint(0, 256, (n, 3, c["size"] * 2, c["size"] * 2), generator=g, dtype=torch.uint8)
    op = torch.arange(n) % len(data.OPS)
    lo, hi = torch.tensor(data.LOW)[op], torch.tensor(data.HIGH)[op]
    v = lo + (hi - lo) * torch.rand(n, generator=g)
    bad = []
    ref = data.apply_ops(x, op, v, subset=True)
    got = data.apply_ops(x.to(dev), op.to(dev), v.to(dev), subset=False).cpu()
    for k, name in enumerate(data.OPS):
        if not torch.equal(got[op == k], ref[op == k]):
            bad.append(name)
    flip = torch.rand(n, generator=g) < 0.5
    dy, dx = (torch.randint(-4, 5, (n,), generator=g) for _ in range(2))
    ref_w = data.flip_translate(x, flip, dy, dx)
    if not torch.equal(data.flip_translate(*(t.to(dev) for t in (x, flip, dy, dx))).cpu(), ref_w):
        bad.append("flip + translate")
    box = [torch.floor(torch.rand(n, generator=g) * x.shape[2]) for _ in range(4)]
    y0, x0, y1, x1 = torch.minimum(box[0], box[2]), torch.minimum(box[1], box[3]), \
        torch.maximum(box[0], box[2]), torch.maximum(box[1], box[3])
    ref_c = data.fill_box(x, y0, x0, y1, x1)
    if not torch.equal(data.fill_box(*(t.to(dev) for t in (x, y0, x0, y1, x1))).cpu(), ref_c):
        bad.append("Cutout box")
    return {"ok": not bad, "detail": (f"differ on the device: {', '.join(bad)}" if bad else
                                      f"{len(data.OPS)} ops, flip + translate, Cutout: identical "
                                      f"on {n} images")}


def check_speed(c: dict, dev: torch.device, tmp: str, compile_: bool) -> dict:
    """bench.py's training step, every method, eager (and compiled), K = 10."""
    import bench
    rows = []
    extra = [] if dev.type == "cuda" else ["--batch-size", str(c["batch"]), "--mu", str(c["mu"])]
    for m in METHODS:
        for comp in ([False, True] if compile_ and dev.type == "cuda" else [False]):
            r = bench.bench_train(dev, 10, c["speed_steps"], c["arch"], comp, tmp, m, extra,
                                  n=4096 if dev.type == "cuda" else 200)
            r["gap_to_target"] = TARGET_STEPS_S / r["steps_s"]
            rows.append(r)
    best = max(rows, key=lambda r: r["steps_s"] if r["method"] == "entropy" else 0)
    ok = all(math.isfinite(r["steps_s"]) and r["steps_s"] > 0 for r in rows)
    return {"ok": ok, "rows": rows, "target_steps_s": TARGET_STEPS_S,
            "detail": f"entropy {best['steps_s']:.2f} steps/s "
                      f"({'compiled' if best['compile'] else 'eager'}), "
                      f"{best['hours_262144_steps']:.1f} h per Table 1 cell; target "
                      f"{TARGET_STEPS_S:.0f} steps/s is {best['gap_to_target']:.1f}x away"
                      + ("" if dev.type == "cuda" else " (CPU form: tiny batch, not comparable)")}


@contextlib.contextmanager
def deterministic():
    """What DETERMINISTIC_TRAIN sets up, in this process, undone after."""
    import train
    was, init = torch.are_deterministic_algorithms_enabled(), train.Run.__init__

    def no_autotune(self, args):
        init(self, args)
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    train.Run.__init__ = no_autotune
    try:
        yield
    finally:
        train.Run.__init__ = init
        torch.use_deterministic_algorithms(was)


def run_train(argv: list, env: dict, kill_at: int | None = None) -> tuple[int, str]:
    """train.py (deterministic kernels) in a subprocess; SIGKILL once step kill_at is logged."""
    p = subprocess.Popen([sys.executable, "-c", DETERMINISTIC_TRAIN.format(here=HERE), *argv],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         cwd=HERE, start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if kill_at is not None and line.startswith(f"step {kill_at}/"):
            os.killpg(p.pid, signal.SIGKILL)
            break
    p.wait()
    return p.returncode, "".join(lines)


def check_resume(c: dict, dataset: str, dev: torch.device, tmp: str, env: dict) -> dict:
    """A Table 1 configuration (default flags; --loss entropy) for run_steps steps: killed after
    kill_at and resumed, vs uninterrupted. Bitwise expected; else within TOL["resume_param"]."""
    half = c["run_steps"] // 2
    extra = ["--epochs", "2", "--steps-per-epoch", str(half), "--save-every", str(c["save_every"]),
             "--log-every", str(c["log_every"])]
    argv = lambda out: train_argv(c, dataset, "entropy", str(dev), out, *extra)  # noqa: E731
    try:  # the uninterrupted run here, in this process (one process start less)
        with deterministic(), contextlib.redirect_stdout(io.StringIO()):
            import train
            train.main(argv(f"{tmp}/ref"))
    except SystemExit as e:
        return {"ok": False, "detail": f"the uninterrupted run failed: {e}"}
    rc, log = run_train(argv(f"{tmp}/killed"), env, kill_at=c["kill_at"])
    if rc != -signal.SIGKILL:
        return {"ok": False, "detail": f"the run to kill ended by itself (status {rc})"}
    rc, log = run_train(argv(f"{tmp}/killed"), env)
    if rc != 0 or "resumed from" not in log:
        return {"ok": False, "detail": f"the resume failed: {log.strip()[-300:]}"}
    ref, got = (torch.load(f"{tmp}/{d}/last.pt", weights_only=True) for d in ("ref", "killed"))
    worst, bitwise = 0.0, True
    for part in ("model", "ema"):
        for k, a in ref[part].items():
            b = got[part][k]
            if not torch.equal(a, b):
                bitwise = False
                if a.is_floating_point():
                    scale = a.abs().max().clamp(min=1e-12)
                    worst = max(worst, ((a - b).abs().max() / scale).item())
                else:
                    worst = math.inf
    same_history = ref["history"] == got["history"]
    ok = bitwise or worst <= TOL["resume_param"]
    how = ("bitwise identical" if bitwise else
           f"not bitwise: largest relative difference {worst:.1e}")
    return {"ok": ok, "bitwise": bitwise, "max_rel_param_diff": worst, "same_history": same_history,
            "detail": f"{c['run_steps']} steps, killed after step {c['kill_at']}, resumed: {how}"
                      f" (test accuracy history {'equal' if same_history else 'differs'})"}


def torchrun_worker(argv: list) -> None:
    """Inside torchrun (or alone): a few training steps; rank 0 writes the losses as JSON."""
    import ddp
    out, steps, train_args = argv[0], int(argv[1]), argv[2:]
    losses = []
    with exact_fp32():
        run = make_run(train_args)
        for _ in range(steps):
            before = run.stats[0].item()
            run.train_step()
            losses.append(run.stats[0].item() - before)
    import torch.distributed as dist
    info = {"losses": losses, "world_size": run.world,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "sync_bn": any(isinstance(m, torch.nn.SyncBatchNorm) for m in run.model.modules())}
    if ddp.world()[0] == 0:
        import checkpoint
        checkpoint.write_text(out, json.dumps(info))
    ddp.close()


def check_torchrun(c: dict, dataset: str, dev: torch.device, tmp: str, env: dict) -> dict:
    """torchrun with every local GPU (a power of two, so that B and mu B divide) or one CPU
    process, vs one process without torchrun on the same global batch (fp32)."""
    n = 1
    while dev.type == "cuda" and n * 2 <= min(torch.cuda.device_count(), c["batch"]):
        n *= 2
    device = "cuda" if dev.type == "cuda" else "cpu"  # torchrun: each rank its local GPU
    res = {}
    for name in ("single", "torchrun"):
        out = f"{tmp}/torchrun_{name}.json"
        argv = [out, str(c["torchrun_steps"]),
                *train_argv(c, dataset, "entropy", device, f"{tmp}/tr_{name}", "--no-amp")]
        if name == "single":  # here, in this process (one process: no torchrun environment)
            torchrun_worker(argv)
        else:
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc_per_node={n}", os.path.join(HERE, "gpu_check.py"),
                                "--torchrun-worker", *argv], capture_output=True, text=True,
                               env=env, cwd=HERE, timeout=600)
            if p.returncode != 0:
                return {"ok": False, "detail": f"torchrun failed: {p.stderr.strip()[-300:]}"}
        with open(out) as fh:
            res[name] = json.load(fh)
    one, many = res["single"]["losses"], res["torchrun"]["losses"]
    err = max(rel(a, b) for a, b in zip(many, one))
    t = res["torchrun"]
    want_sync = dev.type == "cuda" and n > 1
    ok = err <= TOL["torchrun_loss"] and t["world_size"] == n and t["sync_bn"] == want_sync
    return {"ok": ok, "processes": n, "relative_loss_error": err, **{k: t[k] for k in
            ("backend", "sync_bn")},
            "detail": f"{n} process(es), backend {t['backend'] or 'none (one process)'}, "
                      f"SyncBatchNorm {'on' if t['sync_bn'] else 'off'}: {len(one)} step losses vs "
                      f"one process differ by {err:.1e} (tolerance {TOL['torchrun_loss']:.0e})"}


# ---------------------------------------------------------------- the command

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.py --check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (the GPU form) or cpu (the reduced form)")
    p.add_argument("--dataset", default=None,
                   help="dataset of the checks' runs (default: synthetic images), e.g. cifar10")
    p.add_argument("--data-dir", default="data", help="where CIFAR is")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile parts")
    p.add_argument("--skip", default="", help="checks to skip, space-separated")
    p.add_argument("--json", default="gpu_check.json",
                   help="the results (a summary goes beside it, .txt)")
    p.add_argument("--torchrun-worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.torchrun_worker is not None:
        torchrun_worker(a.torchrun_worker)
        return 0
    try:
        dev = torch.device(a.device)
    except RuntimeError:
        p.error(f"--device {a.device!r} is not a device; use cuda or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU (a CPU-only torch build, or no driver); "
                "use --device cpu for the reduced form")
    form = "gpu" if dev.type == "cuda" else "cpu"
    # deterministic cuBLAS for the resume check's run in this process (read when cuBLAS starts)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    c = dict(FORMS[form], data_dir=a.data_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if form == "cpu":
        env["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(dev) if form == "gpu" else "CPU"
    res = {"form": form, "device": name, "gpus": torch.cuda.device_count() if form == "gpu" else 0,
           "torch": torch.__version__, "tolerances": TOL, "target_steps_s": TARGET_STEPS_S,
           "checks": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = a.dataset or write_synthetic(os.path.join(tmp, "synthetic.npz"), c)
        compile_ = not a.no_compile
        checks = [("equivalence", lambda: check_equivalence(c, dataset, dev, tmp, compile_)),
                  ("augmentation", lambda: check_augmentation(c, dev)),
                  ("speed", lambda: check_speed(c, dev, tmp, compile_)),
                  ("resume", lambda: check_resume(c, dataset, dev, tmp, env)),
                  ("torchrun", lambda: check_torchrun(c, dataset, dev, tmp, env))]
        for check, fn in checks:
            if check in a.skip.split():
                res["checks"][check] = {"ok": None, "detail": "skipped (--skip)"}
                continue
            t = time.perf_counter()
            try:
                r = fn()
            except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure is this check's
                r = {"ok": False, "detail": f"{type(e).__name__}: {str(e).strip()[-300:]}"}
            r["wall_s"] = time.perf_counter() - t
            res["checks"][check] = r
            status = {True: "pass", False: "FAIL", None: "skipped"}[r["ok"]]
            print(f"{status:7s} {check}: {r['detail']} ({r['wall_s']:.0f} s)", flush=True)
    res["wall_s"] = time.perf_counter() - t0
    failed = [k for k, r in res["checks"].items() if r["ok"] is False]
    res["passed"] = not failed
    lines = [f"check of {name} ({form} form), torch {torch.__version__}, {res['wall_s']:.0f} s"]
    lines += [f"  {({True: 'pass', False: 'FAIL', None: 'skipped'})[r['ok']]:7s} {k}: {r['detail']}"
              for k, r in res["checks"].items()]
    for r in res["checks"].get("speed", {}).get("rows", []):
        lines.append(f"    {r['method']:>8s} {'compiled' if r['compile'] else 'eager':8s} "
                     f"{r['steps_s']:8.2f} steps/s  peak {r['peak_mem_gib']:.2f} GiB  "
                     f"{r['hours_262144_steps']:7.1f} h per cell  target {TARGET_STEPS_S:.0f} "
                     f"steps/s: {r['gap_to_target']:.1f}x away")
    lines.append("all checks passed" if not failed else
                 "\n".join(f"FAILED: {k}: {res['checks'][k]['detail']}" for k in failed))
    import checkpoint
    summary = "\n".join(lines) + "\n"
    checkpoint.write_text(a.json, json.dumps(res, indent=1, default=str) + "\n")
    checkpoint.write_text(os.path.splitext(a.json)[0] + ".txt", summary)
    print("\n" + summary + f"wrote {a.json} and {os.path.splitext(a.json)[0]}.txt")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
