"""BatchNorm during quantization-aware training: trained on batch statistics first, then frozen into the folded
form export writes.

Export folds each BatchNorm into its convolution with the running statistics: w_f = W * g, b_f = (b - mu) * g + beta,
g = gamma / sqrt(var + eps). Training that folded form directly (BN frozen) leaves a 2- or 3-bit network no way to
re-centre and re-scale the activations its quantization shifts, and below 4 bits it stops learning. So, as integer-
arithmetic QAT does (Jacob et al. 2018), a conv with a BatchNorm trains in two phases:

    batch statistics   w_q = fake_quant(W * g_run) (the weight is quantized as it will be folded, at the running
                       statistics), y = conv(x, w_q) / g_run, then BatchNorm of y with the batch's mean and variance
                       (running statistics updated, momentum 0.1), then the fused ReLU and the output's fake-quant
    frozen             the folded form at the running statistics, exactly the forward export's reference computes

`--qat-bn-freeze F` switches at the fraction F of the run (0.8: the cosine learning rate is down to a tenth there,
and the folded form diverges at larger steps; 0: frozen from the start, the folded form only). The default is the
best measured on ResNet-20 (bench/RESULTS.md): 0.8 when weights or activations are at 2 bits, where the frozen form
stops learning, 0 above, where the batch-statistics phase at the larger learning rate costs accuracy at this budget. The
learned tensors are the raw conv weight and bias, gamma and beta; the running mean and variance are buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["conv_bn_pairs", "fold", "batch_stat_conv"]


def conv_bn_pairs(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """conv module path -> the BatchNorm2d that alone reads its output (the pairs torch.fx's fusion folds)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # a model torch.fx cannot trace plainly (capture specializes it): no pairs, BN stays frozen
        return {}
    mods = dict(model.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(mods.get(src.target), nn.Conv2d)
                and len(src.users) == 1 and mods[node.target].track_running_stats):
            pairs[str(src.target)] = mods[node.target]
    return pairs


def fold(w: torch.Tensor, b: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
         var: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded weight and bias at the running statistics (as torch.fx's fusion folds them)."""
    g = gamma * torch.rsqrt(var + eps)
    return w * g.reshape(-1, *([1] * (w.dim() - 1))), (b - mean) * g + beta


def batch_stat_conv(x: torch.Tensor, w_q: torch.Tensor, attrs: dict, gamma: torch.Tensor, beta: torch.Tensor,
                    mean: torch.Tensor, var: torch.Tensor, eps: float, momentum: float = 0.1) -> torch.Tensor:
    """conv with the quantized folded weight, un-scaled by the running factor, then BatchNorm on the batch's
    statistics; the running mean and variance are updated in place (the conv bias cancels under batch BN)."""
    g_run = (gamma * torch.rsqrt(var + eps)).detach()
    y = F.conv2d(x, w_q, None, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])
    y = y / g_run.reshape(1, -1, 1, 1)
    m = y.mean((0, 2, 3))
    v = y.var((0, 2, 3), unbiased=False)
    with torch.no_grad():
        n = y.numel() / y.shape[1]
        mean.mul_(1 - momentum).add_(m.detach(), alpha=momentum)
        var.mul_(1 - momentum).add_(v.detach() * (n / max(1.0, n - 1)), alpha=momentum)
    scale = gamma * torch.rsqrt(v + eps)
    return (y - m.reshape(1, -1, 1, 1)) * scale.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)
