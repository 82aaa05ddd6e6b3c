"""WideResNet-28-2 backbone (as [G] ran it: USB's wrn_28_2), projection head and class prototypes
(docs/method.md). `variant="tf"` is FixMatch's TensorFlow original instead.

Encoder f = backbone -> head Linear(C,128) -> ReLU -> Linear(128,128) -> L2 normalisation.
Prototypes c_1..c_K are a trainable (K, 128) parameter, normalised where they are used.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_MOMENTUM = 0.001  # FixMatch's TF momentum 0.999 in PyTorch's convention
LEAKY = 0.1


VARIANTS = ("usb", "tf")


class BasicBlock(nn.Module):
    """Pre-activation block: BN -> LeakyReLU -> conv3x3 -> BN -> LeakyReLU -> conv3x3, plus the
    shortcut. `activate_before_residual` (first block of group 1) feeds the activated input to
    the shortcut too; elsewhere the shortcut sees the raw input. `raw_input` (USB's PyTorch port,
    first block of groups 2 and 3) skips the first BN/activation: conv1 and the shortcut both see
    the raw input, and bn1 exists but is unused (as in USB)."""

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool = False,
                 bn_momentum: float = BN_MOMENTUM, raw_input: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, momentum=bn_momentum)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
                         if c_in != c_out or stride != 1 else None)
        self.activate_before_residual = activate_before_residual
        self.raw_input = raw_input
        if raw_input:  # bn1 is never used: no gradient to wait for (DDP), no update, as in USB
            self.bn1.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = x if self.raw_input else F.leaky_relu(self.bn1(x), LEAKY)
        if self.activate_before_residual:
            x = o
        o = self.conv2(F.leaky_relu(self.bn2(self.conv1(o)), LEAKY))
        return (x if self.shortcut is None else self.shortcut(x)) + o


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs (any size works: the pool is global).

    variant "usb" ([G]'s network, USB's wrn_28_2): stem conv with bias, the first block of groups
    2 and 3 feeds its raw input to conv1 and the shortcut, final BN eps 1e-3.
    variant "tf" (FixMatch's TensorFlow original): no stem bias, every block pre-activates,
    final BN eps 1e-5."""

    def __init__(self, depth: int = 28, width: int = 2, bn_momentum: float = BN_MOMENTUM,
                 variant: str = "usb", in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if variant not in VARIANTS:
            raise ValueError(f"WRN variant must be one of {VARIANTS}, got {variant!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        usb = variant == "usb"
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=usb)  # the data's channels
        blocks = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                blocks.append(BasicBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1],
                                         stride if i == 0 else 1,
                                         activate_before_residual=(g == 0 and i == 0),
                                         bn_momentum=bn_momentum,
                                         raw_input=usb and g > 0 and i == 0))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3], momentum=bn_momentum, eps=1e-3 if usb else 1e-5)
        self.out_dim = widths[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.bn(self.blocks(self.stem(x))), LEAKY)
        return x.mean(dim=(2, 3))


class Encoder(nn.Module):
    """Backbone + projection head (L2-normalised output) + K class prototypes, or, for the peer
    methods (docs/peers.md), a linear classifier on the pooled backbone feature instead of prototypes."""

    def __init__(self, num_classes: int, arch: str = "wrn-28-2", dim: int = 128,
                 bn_momentum: float = BN_MOMENTUM, classifier: bool = False, variant: str = "usb",
                 in_channels: int = 3, balanced: bool = False):
        super().__init__()
        depth, width = parse_arch(arch)
        self.backbone = WideResNet(depth, width, bn_momentum, variant, in_channels)
        self.head = nn.Sequential(nn.Linear(self.backbone.out_dim, dim), nn.ReLU(inplace=True),
                                  nn.Linear(dim, dim))
        self.prototypes = None if classifier else nn.Parameter(torch.randn(num_classes, dim))
        self.classifier = nn.Linear(self.backbone.out_dim, num_classes) if classifier else None
        self.classifier_b = None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # the stem's bias (usb) keeps PyTorch's default init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if balanced:  # SeMi's second, balanced head (docs/long_tailed.md), drawn after the rest:
            # the other parameters are initialised exactly as in a one-head model of the same seed
            self.classifier_b = nn.Linear(self.backbone.out_dim, num_classes)
            nn.init.xavier_normal_(self.classifier_b.weight)
            nn.init.zeros_(self.classifier_b.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, logits): the L2-normalised projection, and the classifier logits (None without
        a classifier). One pass over the backbone serves both. With the balanced head (SeMi),
        logits is [head 1 | head 2 | pooled feature h] (N, 2K + C), which the training step
        splits (methods.heads): the one forward pass and view split serve it unchanged."""
        h = self.backbone(x)
        z = F.normalize(self.head(h), dim=1)
        if self.classifier_b is not None:
            return z, torch.cat([self.classifier(h), self.classifier_b(h), h], dim=1)
        return z, (self.classifier(h) if self.classifier is not None else None)

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K) float32: cos(z, c_k) to each prototype, or the classifier logits (peers; SeMi:
        the balanced head 2, which predicts)."""
        return self.scores_and_features(x)[0]

    @torch.no_grad()
    def scores_and_features(self, x: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class scores as class_scores gives them, z, h) in float32, from one pass: z the
        L2-normalised projection, h the backbone feature (query.py's embeddings)."""
        h = self.backbone(x)
        z = F.normalize(self.head(h), dim=1).float()
        if self.classifier_b is not None:
            return self.classifier_b(h).float(), z, h.float()
        if self.classifier is not None:
            return self.classifier(h).float(), z, h.float()
        return z @ F.normalize(self.prototypes.float(), dim=1).T, z, h.float()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest prototype by cosine similarity (docs/method.md, Prediction), or the argmax of the
        classifier logits for the peer methods (docs/peers.md)."""
        return self.class_scores(x).argmax(1)


def parse_arch(arch: str) -> tuple[int, int]:
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", arch)
    if not m:
        raise ValueError(f"--arch must look like wrn-DEPTH-WIDTH (e.g. wrn-28-2, wrn-10-1), got {arch!r}")
    depth, width = int(m.group(1)), int(m.group(2))
    if (depth - 4) % 6 or depth < 10 or width < 1:
        raise ValueError(f"--arch {arch}: depth must be 6n + 4 >= 10 and width >= 1")
    return depth, width


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- CAE (Roda & Geva, after DCEC)

def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def conv_transpose_fold(x: torch.Tensor, layer: nn.ConvTranspose2d, size: tuple) -> torch.Tensor:
    """layer(x) for a ConvTranspose2d (groups 1, dilation 1) with output size `size`, computed as
    the product W^T x at every input pixel followed by col2im (F.fold), which adds each pixel's
    k x k contributions into the output at stride s, padding p: the same sums as the transposed
    convolution (output_padding is the extra row and column `size` asks for). On the CPU it is
    about twice as fast as PyTorch's transposed convolution for a layer with few output channels
    (the CAE's last one, 32 -> 1); docs/speed.md has the measurement."""
    if layer.groups != 1 or layer.dilation != (1, 1):
        raise ValueError("conv_transpose_fold needs groups 1 and dilation 1")
    want = tuple((n - 1) * s - 2 * p + k + op for n, s, p, k, op in zip(
        x.shape[2:], layer.stride, layer.padding, layer.kernel_size, layer.output_padding))
    if tuple(size) != want:
        raise ValueError(f"conv_transpose_fold: this layer maps {tuple(x.shape[2:])} to {want}, "
                         f"not to {tuple(size)}")
    cols = layer.weight.flatten(1).t() @ x.flatten(2)  # (N, C_out k k, H W)
    y = F.fold(cols, size, layer.kernel_size, padding=layer.padding, stride=layer.stride)
    return y if layer.bias is None else y + layer.bias.view(1, -1, 1, 1)


class CAE(nn.Module):
    """Convolutional auto-encoder of DCEC (Guo et al. 2017) as Roda & Geva describe it: encoder
    conv 32 5x5 s2 -> conv 64 5x5 s2 -> conv 128 3x3 s2 -> BatchNorm -> Linear(., 10); decoder
    Linear(10, .) -> BatchNorm -> the three transposed convolutions mirrored. ReLU between
    layers, none on the embedding (it is clustered) or on the reconstruction (MSE on [0, 1]).

    Where the single batch-norm layer of each half sits is not stated; here it normalises the
    128-channel map right before the embedding and right after the de-embedding, where the scale
    of the code meets the convolutions. The third convolution is 'same' when the size is a
    multiple of 8 (16 x 16 USPS: 8, 4, 2) and 'valid' otherwise (28 x 28: 14, 7, 3), as in DCEC;
    the transposed convolutions pick their output padding so the decoder retraces every size.

    Speed on the CPU (docs/speed.md): the last transposed convolution runs as
    `conv_transpose_fold` (`fold_last`, on by default; off, it is the plain layer), and
    `cae_al.py` keeps the network in channels-last memory format.
    """

    def __init__(self, size: int = 28, channels: int = 1, latent: int = 10,
                 filters: tuple = (32, 64, 128), fold_last: bool = True):
        super().__init__()
        self.fold_last = fold_last
        if size < 8:
            raise ValueError(f"CAE needs images of at least 8 x 8, got {size} x {size}")
        f1, f2, f3 = filters
        p3 = 1 if size % 8 == 0 else 0
        s1 = _conv_out(size, 5, 2, 2)
        s2 = _conv_out(s1, 5, 2, 2)
        s3 = _conv_out(s2, 3, 2, p3)
        self.size, self.channels, self.latent, self.s3 = size, channels, latent, s3
        self.conv1 = nn.Conv2d(channels, f1, 5, 2, 2)
        self.conv2 = nn.Conv2d(f1, f2, 5, 2, 2)
        self.conv3 = nn.Conv2d(f2, f3, 3, 2, p3)
        self.bn_enc = nn.BatchNorm2d(f3)
        self.embed = nn.Linear(f3 * s3 * s3, latent)
        self.deembed = nn.Linear(latent, f3 * s3 * s3)
        self.bn_dec = nn.BatchNorm2d(f3)

        def up(c_in, c_out, k, p, n_in, n_out):  # output padding so that n_in maps to n_out
            op = n_out - ((n_in - 1) * 2 - 2 * p + k)
            return nn.ConvTranspose2d(c_in, c_out, k, 2, p, output_padding=op)
        self.deconv3 = up(f3, f2, 3, p3, s3, s2)
        self.deconv2 = up(f2, f1, 5, 2, s2, s1)
        self.deconv1 = up(f1, channels, 5, 2, s1, size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) float in [0, 1] -> z (B, latent)."""
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = self.bn_enc(F.relu(self.conv3(h)))
        return self.embed(h.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.deembed(z)).view(len(z), -1, self.s3, self.s3)
        h = F.relu(self.deconv3(self.bn_dec(h)))
        h = F.relu(self.deconv2(h))
        if self.fold_last and not h.is_cuda:  # on the GPU cuDNN's transposed convolution is fine
            return conv_transpose_fold(h.contiguous(), self.deconv1, (self.size, self.size))
        return self.deconv1(h)


class ClusteringLayer(nn.Module):
    """The DEC clustering layer: K trainable centroids mu_j in the latent space (Roda & Geva's
    Eq. 6 initialises them to the labeled class means, see `init_from`); the soft assignment q
    itself is losses.soft_assign."""

    def __init__(self, k: int = 10, latent: int = 10):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(k, latent))

    @torch.no_grad()
    def init_from(self, z_lb: torch.Tensor, y_lb: torch.Tensor) -> None:
        """mu_c = mean of the labeled latents of class c (Eq. 6); every class needs one."""
        k = len(self.mu)
        counts = torch.bincount(y_lb, minlength=k)
        if (counts == 0).any():
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"the labeled pool has no image of class(es) {missing}; the "
                             f"centroids are class means, so every class needs a label")
        sums = torch.zeros_like(self.mu).index_add_(0, y_lb, z_lb.to(self.mu.dtype))
        self.mu.copy_(sums / counts[:, None].to(sums.dtype))
