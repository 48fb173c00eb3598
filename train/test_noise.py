"""The noise model: std = alpha * step / sqrt(12), exact weight restore, activation noise only in training."""

import math

import pytest
import torch
from torch import nn

from plateau.train import NoiseConfig, NoiseInjector, activation_step, weight_step

torch.set_num_threads(1)


class _Capture(nn.Module):
    """A Linear whose input (after the noise hook) is recorded by a later pre-hook."""

    def __init__(self, n_in: int = 64, n_out: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _with_capture(model: _Capture) -> None:
    model.fc.register_forward_pre_hook(lambda m, a: model.seen.append(a[0].detach().clone()))


def test_weight_step_is_per_channel_max_over_levels():
    w = torch.tensor([[0.5, -1.0], [0.25, 0.1]])
    # 4 bits, narrow symmetric: 2^(4-1) - 1 = 7 positive levels
    assert torch.allclose(weight_step(w, 4).flatten(), torch.tensor([1.0 / 7, 0.25 / 7]))
    # asymmetric activations, range widened to include 0: (2 - 0) / (2^4 - 1)
    assert float(activation_step(0.5, 2.0, 4)) == pytest.approx(2.0 / 15)


@pytest.mark.parametrize("bits,alpha", [("W4A4", 1.0), ("W8A8", 0.5), ("W2A8", 2.0)])
def test_weight_noise_std_matches_model(bits, alpha):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    cfg = NoiseConfig(bits=bits, alpha=alpha, target="weights")
    inj = NoiseInjector(lin, cfg, torch.Generator().manual_seed(1))
    clean = lin.weight.detach().clone()
    expected = alpha * weight_step(clean, inj.cfg.w_bits) / math.sqrt(12)  # (64, 1): per output channel
    with inj.weight_noise():
        z = (lin.weight.detach() - clean) / expected
    # 16384 standard-normal draws: mean within ~4/128, std within a few percent
    assert abs(float(z.mean())) < 0.04
    assert float(z.std()) == pytest.approx(1.0, abs=0.03)
    # per channel too (256 draws each): no channel far off
    assert float((z.std(1) - 1).abs().max()) < 0.25


def test_activation_noise_std_matches_model():
    torch.manual_seed(0)
    m = _Capture(n_in=512)
    cfg = NoiseConfig(bits="W8A4", alpha=1.5, target="activations")
    inj = NoiseInjector(m, cfg, torch.Generator().manual_seed(2))
    _with_capture(m)
    m.train()
    x = torch.rand(64, 512) * 3.0 - 0.5  # range about [-0.5, 2.5]
    m(x)
    lo, hi = inj.act_ranges["fc"]  # first observation initializes the EMA
    assert float(lo) == pytest.approx(float(x.min())) and float(hi) == pytest.approx(float(x.max()))
    expected = 1.5 * float(activation_step(lo, hi, 4)) / math.sqrt(12)
    z = (m.seen[-1] - x) / expected
    assert abs(float(z.mean())) < 0.03
    assert float(z.std()) == pytest.approx(1.0, abs=0.03)


def test_activation_noise_only_in_train_mode():
    m = _Capture()
    inj = NoiseInjector(m, NoiseConfig(bits="W4A4", target="activations"))
    _with_capture(m)
    x = torch.randn(8, 64)
    m.eval()
    m(x)
    assert torch.equal(m.seen[-1], x) and not inj.act_ranges  # no noise, no range update
    m.train()
    m(x)
    assert not torch.equal(m.seen[-1], x)
    m.eval()
    m(x)
    assert torch.equal(m.seen[-1], x)
    with inj.force():  # the Monte Carlo measurement switches it on explicitly
        m(x)
    assert not torch.equal(m.seen[-1], x)


def test_weight_noise_restored_exactly_after_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    inj = NoiseInjector(model, NoiseConfig(bits="W2A2", alpha=3.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with inj.weight_noise():
        assert not torch.equal(model[0].weight, before["0.weight"])
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact, not just close
    assert model[0].weight.grad is not None


def test_quantnoise_fraction_and_ramp_zero():
    lin = nn.Linear(200, 100)
    inj = NoiseInjector(lin, NoiseConfig(bits="W4A8", target="weights", p=0.3))
    clean = lin.weight.detach().clone()
    with inj.weight_noise():
        frac = float((lin.weight.detach() != clean).float().mean())
    assert frac == pytest.approx(0.3, abs=0.02)
    inj.scale = 0.0  # the ramp's first step: no noise at all
    with inj.weight_noise():
        assert torch.equal(lin.weight.detach(), clean)


def test_keep_first_last_8bit():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    inj = NoiseInjector(model, NoiseConfig(bits="W4A4", keep_first_last_8bit=True))
    assert inj.bits == {"0": (8, 8), "1": (4, 4), "3": (8, 8)}


def test_bad_noise_config():
    with pytest.raises(ValueError, match="W<bits>A<bits>"):
        NoiseConfig(bits="W4")
    with pytest.raises(ValueError, match="weights, activations, both"):
        NoiseConfig(target="bias")


def test_range_grad_weight_gradient_equals_autograd_through_the_step():
    """--range-grad: the gradient left by weight_noise() is autograd's for L(w + weight_step(w) * u), u the draw
    over its step; without it, the gradient at the perturbed point alone."""
    torch.manual_seed(0)
    x, target, weight = torch.randn(16, 12), torch.randn(16, 5), torch.randn(5, 12)
    grads = {}
    for coupled in (False, True):
        lin = nn.Linear(12, 5, bias=False)
        lin.weight.data = weight.clone()
        w0 = lin.weight.detach().clone()
        inj = NoiseInjector(lin, NoiseConfig(bits="W3A8", alpha=2.0, target="weights", range_grad=coupled),
                            torch.Generator().manual_seed(7))
        with inj.weight_noise():
            unit = (lin.weight.detach() - w0) / weight_step(w0, 3)
            ((lin(x) - target) ** 2).sum().backward()
        assert torch.equal(lin.weight.detach(), w0)
        grads[coupled] = lin.weight.grad.clone()
        # the same loss as a function of w, the step differentiated too (or held constant)
        w = w0.clone().requires_grad_(True)
        step = w.abs().amax(1, keepdim=True) / 3 if coupled else weight_step(w0, 3)
        ((nn.functional.linear(x, w + step * unit) - target) ** 2).sum().backward()
        assert torch.allclose(grads[coupled], w.grad, rtol=1e-4, atol=1e-4)
    changed = (grads[True] != grads[False]).sum(1)
    assert changed.tolist() == [1] * 5  # one element a channel: its largest |w|


def test_range_grad_activation_gradient_reaches_the_range_ends_only():
    m = _Capture(n_in=32)
    x = torch.randn(4, 32)
    grads = {}
    for coupled in (False, True):
        inj = NoiseInjector(m, NoiseConfig(bits="W8A3", target="activations", range_grad=coupled))
        m.train()
        m(x)  # the first forward records the range
        xg = x.clone().requires_grad_(True)
        y = inj.perturb("fc", xg, 3, training=True)
        (y * torch.linspace(-1, 1, 32)).pow(2).sum().backward()
        grads[coupled] = xg.grad
        if coupled:  # off for a point with a fixed export grid (attention probabilities)
            xf = x.clone().requires_grad_(True)
            inj.perturb("fc", xf, 3, training=True, range_grad=False).sum().backward()
            assert torch.equal(xf.grad, torch.ones_like(x))
        inj.remove()
    diff = (grads[True] != grads[False]).flatten().nonzero().flatten().tolist()
    assert set(diff) <= {int(x.argmin()), int(x.argmax())} and diff


def test_range_grad_needs_a_method_with_noise():
    from plateau.train import TrainConfig

    with pytest.raises(ValueError, match="--range-grad.*none"):
        TrainConfig(method="none", range_grad=True)
    assert TrainConfig(method="alternate", range_grad=True).noise_config().range_grad


def test_attention_probability_noise_width():
    """The attention probabilities get their noise at probability_bits (8 by default: export's grid for them; the
    activation width for a PTQ that quantizes them with the rest), the other attention operands at the activation
    bits; the probabilities' point never differentiates its range (a fixed grid over [0, 1])."""
    from plateau.models import create_model
    from plateau.train.graph_noise import NoisePoint, attention_noise_graph

    m = create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, depth=1, embed_dim=32, num_heads=2,
                     mlp_ratio=2.0)
    inj = NoiseInjector(m, NoiseConfig(bits="W4A3"))
    for prob_bits in (8, 3):
        gm = attention_noise_graph(m, inj, prob_bits)
        points = sorted((p.fixed_range, p.bits) for p in gm.modules() if isinstance(p, NoisePoint))
        assert points == [(False, 3)] * 3 + [(True, prob_bits)]  # q, k, v; the probabilities
    inj.remove()
