"""Throughput measurements (docs/speed.md): augmentation, training step, loss.

    python bench.py                          # CPU, 1 thread for augmentation, writes nothing
    python bench.py --device cuda --compile --json bench_h100.json
    torchrun --nproc_per_node=2 bench.py --threads 1 --skip-aug --methods entropy   # per world size

(1) strong augmentation, images/s: data.py's batched path vs per-sample PIL RandAugment through
    torchvision (flip, reflect-crop, RandAugment(3 ops), Cutout), same device and threads;
(2) training step at the paper's batch (64 + 3 x 448 images; 64 + 2 x 448 for FixMatch and
    SimMatch; synthetic data, K = 10 and 100) for every method of --methods: steps/s, images/s,
    the time spent making the batch, peak memory, hours for 262,144 steps;
(3) loss forward + backward for N = K + 64 + 2 x 448 rows, D = 128, vs a plain SupCon;
(4) with --cae: Roda & Geva's CAE step (cae_al.py: 256 pool + 64 labeled 28 x 28 images,
    L_rec + KL + CCL) beside a plain PyTorch step of the same network and losses, the
    pre-training step, the eval-mode encoder pass of the P refresh, where the step's time goes,
    and the hours of the protocol at these speeds.
"""
import argparse
import copy
import math
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import config
import data
import losses

PAPER_STEPS = 256 * 1024


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, repeat: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds per call: wall clock, and CPU time of this thread (time.thread_time, which
    other processes on a shared machine barely affect; meaningful with one torch thread)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        sync(dev)
        t, c = time.perf_counter(), time.thread_time()
        fn()
        sync(dev)
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return float(np.median(wall)), float(np.median(cpu))


def timeit(fn, dev, repeat: int, warmup: int = 1) -> float:
    """Median wall-clock seconds per call."""
    return timed(fn, dev, repeat, warmup)[0]


def synthetic_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Smooth random colour images with noise (every op has something to do)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    x = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    x = x + 20 * torch.randn(n, 3, size, size, generator=g)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pil_strong_pipeline():
    import torchvision.transforms as T
    from PIL import ImageDraw

    def cutout(img):
        v = np.random.uniform(0, 0.5) * img.size[0]
        cx, cy = np.random.uniform(0, img.size[0]), np.random.uniform(0, img.size[1])
        x0, y0 = int(max(0, cx - v / 2)), int(max(0, cy - v / 2))
        ImageDraw.Draw(img).rectangle((x0, y0, int(min(img.size[0], x0 + v)),
                                       int(min(img.size[1], y0 + v))), (125, 123, 114))
        return img

    return T.Compose([T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4, padding_mode="reflect"),
                      T.RandAugment(num_ops=3), T.Lambda(cutout), T.PILToTensor()])


def pil_op(img, name: str, v: float):
    """One RandAugment op on a PIL image, as USB calls PIL (the reference of the per-op timings)."""
    from PIL import Image, ImageEnhance, ImageOps
    affine = lambda m: img.transform(img.size, Image.AFFINE, m)  # noqa: E731
    return {"AutoContrast": lambda: ImageOps.autocontrast(img),
            "Brightness": lambda: ImageEnhance.Brightness(img).enhance(v),
            "Color": lambda: ImageEnhance.Color(img).enhance(v),
            "Contrast": lambda: ImageEnhance.Contrast(img).enhance(v),
            "Equalize": lambda: ImageOps.equalize(img), "Identity": lambda: img,
            "Posterize": lambda: ImageOps.posterize(img, int(v)), "Rotate": lambda: img.rotate(v),
            "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(v),
            "ShearX": lambda: affine((1, v, 0, 0, 1, 0)),
            "ShearY": lambda: affine((1, 0, 0, v, 1, 0)),
            "Solarize": lambda: ImageOps.solarize(img, v),
            "TranslateX": lambda: affine((1, 0, v * img.size[0], 0, 1, 0)),
            "TranslateY": lambda: affine((1, 0, 0, 0, 1, v * img.size[1]))}[name]()


def bench_augmentation(dev: torch.device, batch: int, repeat: int) -> dict:
    """Ours and PIL are timed in alternating rounds and the fastest round of each is kept: on a
    shared machine, interference only ever adds time, and alternating exposes both to it. Each
    is also timed in CPU time of this thread (`*_cpu_*`), far less sensitive to other processes."""
    from PIL import Image
    x_np = synthetic_images(batch)
    x = data.to_tensor_images(x_np, dev)
    g = torch.Generator(dev).manual_seed(0)
    pipeline, imgs = pil_strong_pipeline(), [Image.fromarray(a) for a in x_np]
    t_ours, t_weak, t_pil, ratios = [], [], [], []
    for _ in range(repeat):
        t_ours.append(timed(lambda: data.strong(x, g), dev, 3, warmup=1 if t_ours else 2))
        t_weak.append(timeit(lambda: data.weak(x, g), dev, 3))
        t_pil.append(timed(lambda: [pipeline(im) for im in imgs], torch.device("cpu"), 1, 0))
        ratios.append(t_pil[-1][0] / t_ours[-1][0])
    ours, pil = min(t[0] for t in t_ours), min(t[0] for t in t_pil)
    ours_cpu, pil_cpu = min(t[1] for t in t_ours), min(t[1] for t in t_pil)
    return {"batch": batch, "rounds": repeat, "ours_strong_img_s": batch / ours,
            "ours_weak_img_s": batch / min(t_weak), "pil_strong_img_s": batch / pil,
            "ratio": pil / ours, "ratio_median_round": float(np.median(ratios)),
            "ours_strong_cpu_img_s": batch / ours_cpu, "pil_strong_cpu_img_s": batch / pil_cpu,
            "ratio_cpu": pil_cpu / ours_cpu}


def bench_ops(dev: torch.device, batch: int, repeat: int) -> dict:
    """Per-op cost: each op applied to a whole batch (data.apply_ops, every image the same op at
    its own magnitude, uniform over the op's range) vs per-sample PIL on the same images and
    magnitudes, in alternating rounds (fastest kept), wall clock and thread CPU time; also the
    weak augmentation and Cutout. A strong batch applies each op to about 3/14 of its images."""
    from PIL import Image
    x_np = synthetic_images(batch)
    x = data.to_tensor_images(x_np, dev)
    imgs = [Image.fromarray(a) for a in x_np]
    g = torch.Generator().manual_seed(0)
    rows = {}
    for _ in range(repeat):
        for name in data.OPS:
            if name == "Identity":
                continue
            lo, hi = data.RANGES[name]
            v = lo + (hi - lo) * torch.rand(batch, generator=g)
            op = torch.full((batch,), data.OP[name], device=dev)
            vd, vl = v.to(dev), v.tolist()
            ours = timed(lambda: data.apply_ops(x, op, vd), dev, 3)
            pil = timed(lambda: [pil_op(im, name, m) for im, m in zip(imgs, vl)],
                        torch.device("cpu"), 1, 0)
            r = rows.setdefault(name, [[], []])
            r[0].append(ours)
            r[1].append(pil)
        gd = torch.Generator(dev).manual_seed(0)
        for name, fn in (("weak", lambda: data.weak(x, gd)),
                         ("cutout", lambda: data.cutout(x, gd))):
            rows.setdefault(name, [[], None])[0].append(timed(fn, dev, 3))
    out = {}
    for name, (ours, pil) in rows.items():
        o = {"ours_ms": 1e3 * min(t[0] for t in ours), "ours_cpu_ms": 1e3 * min(t[1] for t in ours)}
        if pil is not None:
            o["pil_ms"] = 1e3 * min(t[0] for t in pil)
            o["pil_cpu_ms"] = 1e3 * min(t[1] for t in pil)
            o["ratio"] = o["pil_ms"] / o["ours_ms"]
            o["ratio_cpu"] = o["pil_cpu_ms"] / o["ours_cpu_ms"]
        out[name] = o
    return {"batch": batch, "rounds": repeat, "ops": out}


def bench_loss(dev: torch.device, k: int, repeat: int) -> dict:
    n = k + 64 + 2 * 448
    g = torch.Generator().manual_seed(0)
    f = torch.randn(n, 128, generator=g).to(dev).requires_grad_(True)
    y = torch.randint(0, k + 448, (n,), generator=g).to(dev)
    w = torch.rand(n, generator=g).to(dev)

    def plain_supcon():
        z = F.normalize(f, dim=1)
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        lp = torch.log_softmax((z @ z.T / 0.1).masked_fill(eye, -1e9), 1)
        pos = ((y[:, None] == y[None, :]) & ~eye).float()
        npos = pos.sum(1)
        return (-(lp * pos).sum(1) / npos.clamp(min=1))[npos > 0].mean()

    out = {"rows": n}
    for name, fn in (("plain_supcon", plain_supcon),
                     ("pair_weighted", lambda: losses.pair_weighted_supcon(f, y, w, validate=False)),
                     ("anchor_weighted", lambda: losses.anchor_weighted_supcon(f, y, w, validate=False))):
        out[f"{name}_ms"] = 1e3 * timeit(lambda: fn().backward(), dev, repeat, warmup=3)
    out["pair_vs_plain"] = out["pair_weighted_ms"] / out["plain_supcon_ms"]
    return out


def bench_train(dev: torch.device, k: int, steps: int, arch: str, compile_: bool, tmp: str,
                method: str = "entropy", extra: tuple = (), n: int = 4096) -> dict:
    """extra: more train.py flags, n: training images (the check's CPU form makes both tiny)."""
    import methods
    import train
    path = os.path.join(tmp, f"synthetic{k}_{n}.npz")
    rng = np.random.default_rng(0)
    np.savez(path, x_train=synthetic_images(n), y_train=rng.integers(0, k, n),
             x_test=synthetic_images(256, seed=1), y_test=rng.integers(0, k, 256))
    args = config.get_args(["--dataset", f"npz:{path}", "--labels-per-class", "4", "--arch", arch,
                           "--device", str(dev), "--out", os.path.join(tmp, f"run{k}_{method}"),
                           "--loss", method]
                          + (["--entropy-ratio", "0.2"] if method == "entropy" else [])
                          + (["--compile"] if compile_ else []) + list(extra))
    run = train.Run(args)
    warmup = 3 if compile_ else 1
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    t_step = timeit(run.train_step, dev, steps, warmup)
    t_batch = timeit(run.batch, dev, steps, 1)
    images = args.batch_size * (1 + (1 + methods.STRONG_VIEWS[method]) * args.mu)
    peak = (torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"method": method, "k": k, "arch": arch, "compile": compile_, "amp": str(run.amp_dtype),
            "world_size": run.world, "comm_mib_per_step": comm_mib(run, images),
            "images": images,
            "step_ms": 1e3 * t_step, "steps_s": 1 / t_step, "images_s": images / t_step,
            "batch_ms": 1e3 * t_batch, "data_share": t_batch / t_step,
            "peak_mem_gib": peak, "hours_262144_steps": PAPER_STEPS * t_step / 3600}


def comm_mib(run, images: int) -> float:
    """MiB each rank sends and receives per step under torchrun (0 for one process): the
    all-gather of the outputs (z and logits, float32) and DDP's ring all-reduce of the gradients,
    2 (N - 1) / N times their size."""
    n = run.world
    if n == 1:
        return 0.0
    width = 128 + (run.k if run.args.loss in ("fixmatch", "ccssl", "simmatch") else 0)
    grads = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    gather = images * width * (n - 1) / n
    return 4 * (gather + 2 * grads * (n - 1) / n) / 2**20


def aug_and_loss(res: dict, dev: torch.device, aug_batch: int, repeat: int, name: str) -> None:
    """(1) augmentation and (3) loss timings, printed and stored in res."""
    res["augmentation"] = a = bench_augmentation(dev, aug_batch, repeat)
    print(f"\n(1) strong augmentation, {a['batch']}-image batches, {name}")
    print(f"    ours (batched, {dev.type})   {a['ours_strong_img_s']:10.0f} img/s   "
          f"(weak alone {a['ours_weak_img_s']:.0f} img/s)")
    print(f"    PIL per sample (CPU)     {a['pil_strong_img_s']:10.0f} img/s")
    print(f"    ratio                    {a['ratio']:10.1f} x   (median over {a['rounds']} "
          f"alternating rounds: {a['ratio_median_round']:.1f} x)")
    print(f"    in thread CPU time: ours {a['ours_strong_cpu_img_s']:.0f} img/s, PIL "
          f"{a['pil_strong_cpu_img_s']:.0f} img/s, ratio {a['ratio_cpu']:.1f} x")
    res["ops"] = o = bench_ops(dev, aug_batch, repeat)
    print(f"\n(1b) per op, {o['batch']} images all with that op (a strong batch gives each op "
          f"about 3/14 of its images), fastest of {o['rounds']} rounds; ms wall (ms thread CPU)")
    print(f"    {'op':13s} {'ours':>17s} {'PIL per sample':>19s} {'ratio':>14s}")
    for k, r in o["ops"].items():
        print(f"    {k:13s} {r['ours_ms']:7.2f} ({r['ours_cpu_ms']:7.2f})"
              + (f" {r['pil_ms']:8.2f} ({r['pil_cpu_ms']:8.2f}) {r['ratio']:5.1f} x "
                 f"({r['ratio_cpu']:5.1f} x)" if "pil_ms" in r else ""))

    res["loss"] = []
    print("\n(3) loss forward + backward, D = 128")
    for k in (10, 100):
        r = bench_loss(dev, k, repeat)
        res["loss"].append(r)
        print(f"    K={k:3d} N={r['rows']}: plain SupCon {r['plain_supcon_ms']:.2f} ms, "
              f"Eq. (8) {r['pair_weighted_ms']:.2f} ms ({r['pair_vs_plain']:.2f}x), "
              f"Eq. (6) {r['anchor_weighted_ms']:.2f} ms")


def bench_cae(repeat: int, size: int = 28, batch: int = 256, batch_lb: int = 64,
              pool: int = 48000) -> dict:
    """(4): img/s of cae_al.train_step vs a plain step, plus where the time goes (CPU)."""
    import types

    import cae_al
    import model
    torch.manual_seed(0)
    a = types.SimpleNamespace(no_ccl=False, tau=1.0, ccl_form="printed", alpha_rec=1.0,
                              alpha_clu=0.1, alpha_ccl=0.1)
    cae, clu = model.CAE(size), model.ClusteringLayer(10, 10)
    plain_cae = copy.deepcopy(cae)  # the plain network: nn layers, contiguous memory
    plain_cae.fold_last = False
    cae = cae.to(memory_format=torch.channels_last)  # as cae_al.Run keeps it
    run = types.SimpleNamespace(a=a, cae=cae, clu=clu, opt=torch.optim.Adam(
        [*cae.parameters(), *clu.parameters()], 1e-3))
    plain_opt = torch.optim.Adam([*plain_cae.parameters(), *clu.parameters()], 1e-3)
    x, x_lb = torch.rand(batch, 1, size, size), torch.rand(batch_lb, 1, size, size)
    y_lb = torch.arange(batch_lb) % 10
    p = torch.softmax(torch.randn(batch, 10), 1)
    ours = timeit(lambda: cae_al.train_step(run, x, p, x_lb, y_lb), torch.device("cpu"), repeat)

    def plain():  # the textbook way: two encoder passes, broadcast distances, F.kl_div
        z, z_lb = plain_cae.encode(x), plain_cae.encode(x_lb)
        q = 1 / (1 + ((z[:, None] - clu.mu) ** 2).sum(-1))
        q = q / q.sum(1, keepdim=True)
        s = z_lb @ clu.mu.T
        neg = torch.stack([torch.logsumexp(s[y_lb != c, c], 0) for c in range(10)])
        ccl = (neg[y_lb] - s.gather(1, y_lb[:, None]).squeeze(1)).mean()
        loss = F.mse_loss(plain_cae.decode(z), x) + 0.1 * F.kl_div(q.log(), p, reduction="batchmean") \
            + 0.1 * ccl
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()
    ref = timeit(plain, torch.device("cpu"), repeat)

    def pre():
        loss = F.mse_loss(cae.decode(cae.encode(x)), x)
        run.opt.zero_grad()
        loss.backward()
        run.opt.step()
    pre_s = timeit(pre, torch.device("cpu"), repeat)
    x_eval = torch.randint(0, 256, (2048, 1, size, size), dtype=torch.uint8)
    enc_s = timeit(lambda: cae_al.encode_all(cae, x_eval), torch.device("cpu"), max(1, repeat // 2))
    with torch.profiler.profile() as prof:
        cae_al.train_step(run, x, p, x_lb, y_lb)
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ops.values())
    share = {"convolution forward": sum(v for k, v in ops.items() if k in (
                 "aten::mkldnn_convolution", "aten::_convolution", "aten::slow_conv_transpose2d",
                 "aten::col2im")),  # col2im: the last layer's fold
             "convolution backward": ops.get("aten::convolution_backward", 0) + ops.get("aten::im2col", 0)}
    share = {k: v / total for k, v in share.items()}
    share["everything else"] = 1 - sum(share.values())
    r = {"size": size, "batch": batch, "batch_lb": batch_lb, "step_ms": 1e3 * ours,
         "images_s": batch / ours, "plain_images_s": batch / ref, "vs_plain": ref / ours,
         "pretrain_images_s": batch / pre_s, "encode_images_s": len(x_eval) / enc_s,
         "time_share": share}
    # the protocol: 50 pre-training epochs, 21 rounds x 10 epochs, P over the pool every 80 steps
    steps_round = 10 * math.ceil(pool / batch)
    r["protocol_hours"] = (50 * pool / r["pretrain_images_s"] + 21 * steps_round * ours
                           + 21 * math.ceil(steps_round / 80) * pool / r["encode_images_s"]) / 3600
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch (and PIL: one process) threads")
    p.add_argument("--aug-batch", type=int, default=448, help="images per augmentation batch")
    p.add_argument("--repeat", type=int, default=None, help="timed repetitions (default 10 / 30 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 2 / 50 CUDA)")
    p.add_argument("--arch", default="wrn-28-2")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in (2)")
    p.add_argument("--skip-train", action="store_true", help="skip (2), the slow part on CPU")
    p.add_argument("--skip-aug", action="store_true", help="skip (1) and (3): the step only")
    p.add_argument("--methods", default="base entropy fixmatch ccssl simmatch",
                   help="--loss values timed in (2), space-separated")
    p.add_argument("--ks", default="10 100", help="numbers of classes K timed in (2)")
    p.add_argument("--cae", action="store_true", help="also (4), the CAE step of cae_al.py")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--check", action="store_true",
                   help="run the prepared check of the training path instead (docs/speed.md): "
                        "python bench.py --check --help")
    if "--check" in sys.argv[1:]:  # the check has its own options
        import gpu_check
        sys.exit(gpu_check.main([a for a in sys.argv[1:] if a != "--check"]))
    args = p.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    cuda = dev.type == "cuda"
    repeat = args.repeat or (30 if cuda else 10)
    steps = args.steps or (50 if cuda else 2)
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {args.threads} thread(s)"
    res = {"device": name, "threads": args.threads, "torch": torch.__version__}

    if not args.skip_aug:
        aug_and_loss(res, dev, args.aug_batch, repeat, name)
    if not args.skip_train:
        res["train"] = []
        print(f"\n(2) training step at the paper's batch, {args.arch}, {name}")
        with tempfile.TemporaryDirectory() as tmp:
            for method, k in [(m, int(k)) for m in args.methods.split() for k in args.ks.split()]:
                r = bench_train(dev, k, steps, args.arch, args.compile, tmp, method)
                res["train"].append(r)
                print(f"    {method:>8s} K={k:3d} ({r['images']} img): {r['steps_s']:.2f} steps/s, "
                      f"{r['images_s']:.0f} img/s, "
                      f"step {r['step_ms']:.0f} ms of which batch (data) {r['batch_ms']:.0f} ms "
                      f"({100 * r['data_share']:.0f} %), peak mem {r['peak_mem_gib']:.2f} GiB, "
                      f"262,144 steps = {r['hours_262144_steps']:.1f} h"
                      + (f", {r['world_size']} processes, {r['comm_mib_per_step']:.1f} MiB "
                         f"communicated per rank and step" if r["world_size"] > 1 else ""))
    if args.cae:
        r = res["cae"] = bench_cae(repeat)
        print(f"\n(4) CAE step ({r['batch']} + {r['batch_lb']} images, {r['size']} x {r['size']}), "
              f"{name}: {r['images_s']:.0f} img/s ({r['step_ms']:.0f} ms), plain PyTorch step "
              f"{r['plain_images_s']:.0f} img/s (x{r['vs_plain']:.2f}); pre-training step "
              f"{r['pretrain_images_s']:.0f} img/s; eval encoder {r['encode_images_s']:.0f} img/s; "
              f"time: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in r["time_share"].items())
              + f"; the whole protocol on a 48,000-image pool: {r['protocol_hours']:.1f} h")
    if args.json and int(os.environ.get("RANK", 0)) == 0:
        checkpoint.write_text(args.json, checkpoint.dumps_json(res, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
