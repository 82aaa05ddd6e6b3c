"""The augmentation ops as they were before they were made faster (plain float64 coordinate
grids, a validity mask, one op per slice, index_copy_), kept verbatim as a reference: the fast
ops in data.py must give the same uint8 images, bit for bit, on random batches, magnitudes in
and beyond each op's range, both paths (per-op slices and whole batch), odd image sizes, and the
whole strong augmentation (which must also draw the same random numbers)."""
import pytest
import torch

import data
from data import AFFINE, ENHANCE, LOOKUP, OP, OPS, _const

# ---------------------------------------------------------------- the reference (unchanged code)

def _gather_pixels(x: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
    """out[n, c, y, x] = x[n, c, iy[n, y, x], ix[n, y, x]], 0 where (iy, ix) is outside the
    image. iy, ix hold integers as float32: index arithmetic in float32 is exact here and about
    2x cheaper than in int64 on CPU."""
    n, c, h, w = x.shape
    ixc, iyc = ix.clamp(0, w - 1), iy.clamp(0, h - 1)
    valid = (ixc == ix) & (iyc == iy)  # unchanged by the clamp = inside
    idx = torch.addcmul(ixc, iyc, torch.full_like(iyc[:1, :1, :1], w)).long()
    out = x.reshape(n, c, h * w).gather(2, idx.view(n, 1, h * w).expand(n, c, h * w))
    return out.view(n, c, h, w) * valid.unsqueeze(1)  # black outside; a multiply beats where on CPU


def _pil_round15(t: torch.Tensor) -> torch.Tensor:
    """PIL's Image.rotate rounds cos and sin to 15 decimals (Python's round(v, 15))."""
    return torch.round(t * 1e15) / 1e15


def _affine(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor, present=AFFINE) -> torch.Tensor:
    """Rotate / ShearX / ShearY / TranslateX / TranslateY exactly as PIL's Image.transform(AFFINE)
    and Image.rotate do with NEAREST. Output pixel (x, y) reads input (a x' + b y' + c,
    d x' + e y' + f) at the pixel centre (x', y') = (x + .5, y + .5), with PIL's arithmetic:
    the coefficients in double precision (Rotate's cos / sin rounded to 15 decimals, about the
    centre (w/2, h/2)); a map with b = d = 0 (translations) by PIL's scaling path, floor of the
    double coordinate; any other (rotations, shears) by PIL's 16.16 fixed-point path, where
    each coefficient is rounded to a multiple of 1/65536 and the coordinate is shifted right
    by 16. Black outside."""
    n, _, h, w = x.shape
    v = v.double()  # the magnitude as PIL receives it: a Python float
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    a, b, c, d, e, f = one, zero, zero, zero, one, zero
    if OP["ShearX"] in present:
        b = torch.where(op == OP["ShearX"], v, b)
    if OP["ShearY"] in present:
        d = torch.where(op == OP["ShearY"], v, d)
    if OP["TranslateX"] in present:
        c = torch.where(op == OP["TranslateX"], v * w, c)
    if OP["TranslateY"] in present:
        f = torch.where(op == OP["TranslateY"], v * h, f)
    if OP["Rotate"] in present:
        rot = op == OP["Rotate"]
        theta = -torch.deg2rad(torch.remainder(v, 360.0))  # PIL: angle % 360, then -radians
        cos, sin = _pil_round15(torch.cos(theta)), _pil_round15(torch.sin(theta))
        cx, cy = w / 2.0, h / 2.0  # the matrix maps (-cx, -cy), then adds the centre back
        a, b = torch.where(rot, cos, a), torch.where(rot, sin, b)
        d, e = torch.where(rot, -sin, d), torch.where(rot, cos, e)
        c = torch.where(rot, (cos * -cx + sin * -cy) + cx, c)
        f = torch.where(rot, (-sin * -cx + cos * -cy) + cy, f)
    p = [t.view(n, 1, 1) for t in (a, b, c, d, e, f)]
    ys = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1)
    xs = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w)
    # PIL's scaling path (ImagingScaleAffine): floor(c + a/2 + a x), floor(f + e/2 + e y)
    x_in = (p[2] + p[0] * 0.5) + xs * p[0]
    y_in = (p[5] + p[4] * 0.5) + ys * p[4]
    # PIL's fixed-point path (affine_fixed): integers in double are exact here (< 2^53)
    fix = [torch.floor(t * 65536.0 + 0.5) for t in
           (p[0], p[1], p[2] + p[0] * 0.5 + p[1] * 0.5, p[3], p[4], p[5] + p[3] * 0.5 + p[4] * 0.5)]
    fixed = ((b != 0) | (d != 0)).view(n, 1, 1)
    x_in = torch.where(fixed, (fix[2] + ys * fix[1] + xs * fix[0]) / 65536.0, x_in)
    y_in = torch.where(fixed, (fix[5] + ys * fix[4] + xs * fix[3]) / 65536.0, y_in)
    return _gather_pixels(x, y_in.floor_().float(), x_in.floor_().float())


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16 (exact in float32)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((19595.0 * r + 38470.0 * g + 7471.0 * b + 32768.0) / 65536.0)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageFilter.SMOOTH: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13, rounded; border pixels kept.
    Written as a 3x3 box sum plus 4x the centre: on CPU this is ~10x faster than a depthwise conv."""
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    box = rows[:, :, :, :-2] + rows[:, :, :, 1:-1] + rows[:, :, :, 2:]
    inner = torch.floor((box + 4.0 * x[:, :, 1:-1, 1:-1]) / 13.0 + 0.5)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def _enhance(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor, present=ENHANCE) -> torch.Tensor:
    """PIL ImageEnhance: Image.blend(degenerate, img, v) = trunc(deg + v (img - deg)), clipped.
    Degenerate: black (Brightness), grayscale (Color), mean gray level (Contrast), SMOOTH-filtered
    (Sharpness). Images with another op get factor 1, which returns them unchanged exactly.
    `present` lists the ops that may occur, so that the CPU path computes no unused degenerate."""
    o = op.view(-1, 1, 1, 1)
    x = x.float()
    degs = {OP["Brightness"]: torch.zeros_like(x[:, :1, :1, :1])}
    if OP["Color"] in present or OP["Contrast"] in present:
        gray = _grayscale(x)
        degs[OP["Color"]] = gray
        degs[OP["Contrast"]] = torch.floor(gray.mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    if OP["Sharpness"] in present:
        degs[OP["Sharpness"]] = _smooth(x)
    if len(present) == 1:
        deg = degs[present[0]]
    else:  # per-image choice as a sum of 0/1-masked terms: exact, and far cheaper than where on CPU
        deg = sum(d * (o == k) for k, d in degs.items() if k in present)
    factor = torch.where(torch.isin(op, _const(tuple(ENHANCE), op.device)), v, 1.0)
    # truncation toward zero of a non-negative float, as PIL's (UINT8) cast
    return (deg + factor.view(-1, 1, 1, 1) * (x - deg)).clamp_(0, 255).to(torch.uint8)


def _lookup(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor, present=LOOKUP) -> torch.Tensor:
    """PIL ImageOps: Solarize, Posterize as pixel maps; AutoContrast, Equalize as per-image,
    per-channel 256-entry tables, built in float64 because PIL builds them in Python floats.
    Images with another op are returned unchanged."""
    n, c, h, w = x.shape
    o = op.view(n, 1, 1, 1)
    vv = v.view(n, 1, 1, 1)
    if OP["Solarize"] in present:  # invert the values >= threshold v, i.e. >= ceil(v) (integers)
        flip = x >= torch.ceil(vv).clamp(0, 256).to(torch.int16)  # integer compare, no float
        if len(present) > 1:
            flip &= o == OP["Solarize"]
        x = x ^ (flip.to(torch.uint8) * 255)  # 255 - x = x xor 255 for uint8
    if OP["Posterize"] in present:  # keep the top int(v) bits: x & (256 - 2^(8 - bits))
        mask = torch.where(o == OP["Posterize"], 256.0 - torch.exp2(8 - torch.floor(vv)), 255.0)
        x = x & mask.to(torch.uint8)
    if OP["AutoContrast"] not in present and OP["Equalize"] not in present:
        return x
    xl = x.long().view(n, c, h * w)
    i = torch.arange(256, device=x.device, dtype=torch.float64).expand(n, c, 256)
    o = op.view(n, 1, 1)
    lut = i
    hi_x = x.amax(dim=(2, 3))
    if OP["AutoContrast"] in present:  # stretch [min, max] of each channel to [0, 255]
        lo = x.amin(dim=(2, 3)).double().unsqueeze(2)
        hi = hi_x.double().unsqueeze(2)
        # a true division as in PIL: `255.0 / tensor` would multiply by a rounded reciprocal
        scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)
        stretched = torch.floor(i * scale - lo * scale).clamp(0, 255)
        lut = torch.where((o == OP["AutoContrast"]) & (hi > lo), stretched, lut)
    if OP["Equalize"] in present:  # PIL: step = (count - count of the last nonzero bin) // 255,
        hist = torch.zeros(n, c, 256, device=x.device, dtype=torch.float64)  # lut[i] =
        hist.scatter_add_(2, xl, torch.ones_like(xl, dtype=torch.float64))  # (step // 2 +
        last = hist.gather(2, hi_x.long().unsqueeze(2))                     # #pixels < i) // step
        step_eq = torch.floor((h * w - last) / 255.0)
        below = torch.cumsum(hist, 2) - hist
        equalized = torch.floor((torch.floor(step_eq / 2) + below) / step_eq.clamp(min=1))
        lut = torch.where((o == OP["Equalize"]) & (step_eq > 0), equalized.clamp(0, 255), lut)
    return lut.to(torch.uint8).gather(2, xl).view(n, c, h, w)


_FAMILIES = ((AFFINE, _affine), (ENHANCE, _enhance), (LOOKUP, _lookup))
_FAMILY_OF = {k: fn for members, fn in _FAMILIES for k in members}


def apply_ops(x: torch.Tensor, op: torch.Tensor, v: torch.Tensor, subset: bool | None = None,
              inplace: bool = False) -> torch.Tensor:
    """Apply op[i] with magnitude v[i] to image i of x (uint8, N, 3, H, W).
    subset=True runs each op on its own images only (it needs a host sync: the CPU default);
    False runs each family on the whole batch with identity parameters for the images that drew
    another op (no sync: the CUDA default). inplace=True lets the subset path write into x."""
    if x.dtype != torch.uint8:
        raise ValueError(f"augmentation works on uint8 images, got {x.dtype}")
    subset = x.device.type == "cpu" if subset is None else subset
    if not subset:
        for members, fn in _FAMILIES:
            sel = torch.isin(op, _const(tuple(members), op.device))
            x = fn(x, torch.where(sel, op, OP["Identity"]), v)
        return x
    # sort the images by op once, so that each op works on a contiguous slice (a view)
    order = torch.argsort(op, stable=True)
    counts = torch.bincount(op, minlength=len(OPS)).tolist()
    xs, op_s, v_s = x.index_select(0, order), op[order], v[order]
    start = 0
    for k, count in enumerate(counts):
        end = start + count
        if count and k != OP["Identity"]:
            xs[start:end] = _FAMILY_OF[k](xs[start:end], op_s[start:end], v_s[start:end], (k,))
        start = end
    out = x if inplace else torch.empty_like(x)
    return out.index_copy_(0, order, xs)



# ---------------------------------------------------------------- the tests


def strong_before(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """data.strong with the reference ops: the same draws in the same order."""
    x = data.weak(x, g)
    n = x.shape[0]
    ops = torch.randint(0, len(OPS), (3, n), generator=g)
    u = torch.rand(3, n, generator=g)
    lo = _const(data.LOW, x.device, torch.float32)[ops]
    hi = _const(data.HIGH, x.device, torch.float32)[ops]
    for j in range(3):
        x = apply_ops(x, ops[j], lo[j] + (hi[j] - lo[j]) * u[j], inplace=True)
    return data.cutout(x, g)


def random_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Noise over smooth colour blobs, with some flat and saturated images (AutoContrast's and
    Equalize's special cases)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 3, 3, generator=g) * 320 - 30
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = (x + 30 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 255).round().to(torch.uint8)
    x[0] = 77  # flat
    x[1, 0] = 255
    return x


@pytest.mark.parametrize("h, w", [(32, 32), (24, 37), (5, 5)])
@pytest.mark.parametrize("spread", [1.0, 4.0])
def test_fast_ops_equal_the_previous_implementation(h, w, spread):
    """spread 4: magnitudes up to four times each op's range (rotations past 90 degrees, shears
    and translations far outside the image), where the coordinate arithmetic is stressed."""
    n = 168
    x = random_images(n, h, w, seed=h * w)
    g = torch.Generator().manual_seed(int(spread))
    op = torch.randint(0, len(OPS), (n,), generator=g)
    lo, hi = torch.tensor(data.LOW)[op], torch.tensor(data.HIGH)[op]
    mid = (lo + hi) / 2
    v = mid + (hi - lo) * spread * (torch.rand(n, generator=g) - 0.5)
    v[op == OP["Posterize"]] = v[op == OP["Posterize"]].clamp(0, 8)  # PIL takes 0..8 bits only
    v[:14] = torch.tensor(data.LOW)[op[:14]]  # the ends of the ranges, exactly
    v[14:28] = torch.tensor(data.HIGH)[op[14:28]]
    v[28:42] = mid[28:42]  # Rotate / Shear / Translate by exactly 0
    for subset in (True, False):
        ref = apply_ops(x, op, v, subset=subset)
        assert torch.equal(data.apply_ops(x, op, v, subset=subset), ref), (h, w, spread, subset)
    one = torch.full((n,), OP["Rotate"])  # the whole batch one op (the all-affine slice)
    assert torch.equal(data.apply_ops(x, one, v), apply_ops(x, one, v))


def test_fast_strong_augmentation_equals_the_previous_one():
    x = random_images(128, 32, 32, seed=1)
    for seed in range(3):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(data.strong(x, g1), strong_before(x, g2))
        assert torch.equal(g1.get_state(), g2.get_state())  # the same random numbers drawn
