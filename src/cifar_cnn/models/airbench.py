"""A fast net of the airbench family (Keller Jordan's CIFAR-10 speedruns), written for this package.

What makes it fast to train: a frozen 2x2 patch-whitening first layer computed from the training images, convolutions
initialised as the identity on their first channels (dirac), batch norm with a frozen scale and quick running
statistics, GELU, global max-pooling and a scaled-down linear head. It is meant to be trained with the `muon`
optimizer (orthogonalized updates for the conv filters, Nesterov SGD for the rest), label smoothing, a linearly
decaying LR, alternating flips and flip+translate test-time augmentation: see the `quick`, `fast` and `accurate`
recipes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class FrozenScaleBN(nn.BatchNorm2d):
    """Batch norm whose scale stays 1 (only the shift trains); `momentum` as in airbench (weight of the old stats)."""

    def __init__(self, channels: int, momentum: float = 0.6, eps: float = 1e-12) -> None:
        super().__init__(channels, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad_(False)


def dirac_conv3(c_in: int, c_out: int) -> nn.Conv2d:
    """3x3 conv whose first min(c_in, c_out) filters start as the identity on the matching input channel."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


class ConvGroup(nn.Module):
    """conv, 2x2 max-pool, BN, GELU, then (depth - 1) x (conv, BN, GELU); residual over those when depth >= 3."""

    def __init__(self, c_in: int, c_out: int, depth: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1, self.bn1 = dirac_conv3(c_in, c_out), FrozenScaleBN(c_out, bn_momentum)
        self.convs = nn.ModuleList(dirac_conv3(c_out, c_out) for _ in range(depth - 1))
        self.bns = nn.ModuleList(FrozenScaleBN(c_out, bn_momentum) for _ in range(depth - 1))
        self.residual = depth >= 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        skip = x
        for conv, bn in zip(self.convs, self.bns):
            x = F.gelu(bn(conv(x)))
        return x + skip if self.residual else x


class AirNet(nn.Module):
    """Patch whitening -> three conv groups (each halves the resolution) -> global max-pool -> linear head."""

    head_name = "head"
    early_params = ("whiten.bias",)  # trained over the first epochs only (config.early_params_epochs)

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, ...] = (64, 256, 256),
        depth: int = 2,
        whiten_kernel: int = 2,
        bn_momentum: float = 0.6,
        head_scale: float = 1 / 256,
        whiten_stride: int = 1,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if depth < 1 or not widths or min(widths) < 1:
            raise ValueError(f"depth and every width must be >= 1, got depth={depth}, widths={widths}")
        self.head_scale = head_scale
        c0 = 2 * 3 * whiten_kernel**2  # each whitening filter and its negative (GELU then keeps both signs)
        self.whiten = nn.Conv2d(3, c0, whiten_kernel, bias=True)
        # stride = kernel: non-overlapping patches, every later layer at 1/kernel^2 of the pixels (and FLOPs)
        self.set_whiten_stride(whiten_stride)
        self.whiten.weight.requires_grad_(False)  # set from the data by init_from_data, never trained
        chans = (c0, *widths)
        self.groups = nn.ModuleList(ConvGroup(chans[i], chans[i + 1], depth, bn_momentum) for i in range(len(widths)))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        with torch.no_grad():
            self.head.weight /= self.head.weight.std()

    def set_whiten_stride(self, stride: int) -> None:
        """Run the whitening layer at `stride` 1 (overlapping patches, full resolution) or at its kernel size
        (non-overlapping patches: 1/kernel^2 of the pixels from there on); the weights fit both (progressive resizing:
        config.patch_epochs)."""
        k = self.whiten.kernel_size[0]
        if stride not in (1, k):
            raise ValueError(f"whiten_stride must be 1 or whiten_kernel ({k}), got {stride}")
        self.whiten.stride = (stride, stride)

    @contextlib.contextmanager
    def full_resolution(self) -> Iterator[None]:
        """The net as it is saved (the whitening layer at stride 1) inside the block, whatever stride it trains at
        now (validation and probes during patch epochs)."""
        stride = self.whiten.stride
        self.whiten.stride = (1, 1)
        try:
            yield
        finally:
            self.whiten.stride = stride

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening filters from the covariance of k x k patches of (normalized) training images."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, h, w, k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)
        cov = patches.T @ patches / len(patches)
        evals, evecs = torch.linalg.eigh(cov)
        w = (evecs.T / torch.sqrt(evals + eps)[:, None]).reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat([w, -w]).to(self.whiten.weight))
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(x))
        for group in self.groups:
            x = group(x)
        return self.head(torch.amax(x, dim=(2, 3))) * self.head_scale


@register_model("airbench")
def airbench(
    num_classes: int = 10,
    widths: tuple[int, ...] | list[int] = (64, 256, 256),
    depth: int = 2,
    whiten_kernel: int = 2,
    bn_momentum: float = 0.6,
    head_scale: float = 1 / 256,
    whiten_stride: int = 1,
) -> AirNet:
    """Airbench-style fast net (1.97 M parameters at widths 64-256-256): patch whitening, dirac init, fast BN.
    `whiten_stride` 2 (= the kernel): the whitening layer takes non-overlapping 2x2 patches, so the net runs at 16 x 16
    from there on, a quarter of the FLOPs (the `instant` recipe)."""
    return AirNet(num_classes, tuple(widths), depth, whiten_kernel, bn_momentum, head_scale, whiten_stride)
