"""Flatness measures checked against exact answers on tiny models."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plateau.train import NoiseConfig, hessian_trace, noise_loss_increase, quantized_weights, top_eigenvalue

torch.set_num_threads(1)


def _half_mse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - t) ** 2).sum(1).mean()


def _linear_case(n_in=5, n_out=3, n=64, seed=0):
    """y = W x with loss 1/2 mean ||Wx - t||^2: H = I_out (x) (X^T X / N), known in closed form."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g) * torch.linspace(0.5, 2.0, n_in)
    t = torch.randn(n, n_out, generator=g)
    lin = nn.Linear(n_in, n_out, bias=False)
    c = (x.T @ x / n).double().numpy()
    return lin, [(x[:32], t[:32]), (x[32:], t[32:])], c, n_out


def test_hutchinson_matches_closed_form_trace_linear():
    lin, batches, c, n_out = _linear_case()
    exact = n_out * np.trace(c)
    est = hessian_trace(lin, batches, n_samples=400, loss_fn=_half_mse, seed=1)
    assert abs(est["trace"] - exact) < 4 * est["std_err"] + 1e-6
    assert abs(est["trace"] - exact) / exact < 0.1
    assert est["n_params"] == lin.weight.numel()


def test_hutchinson_matches_exact_hessian_small_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    params = quantized_weights(model)
    names = [n for n, p in model.named_parameters() if any(p is q for q in params)]

    def loss_of(*ws):  # loss as a function of the two weight matrices only
        state = {**dict(model.named_parameters()), **dict(zip(names, ws, strict=True))}
        return F.cross_entropy(torch.func.functional_call(model, state, (x,)), y)

    hess = torch.autograd.functional.hessian(loss_of, tuple(p.detach() for p in params))
    exact = sum(float(hess[i][i].reshape(p.numel(), p.numel()).trace()) for i, p in enumerate(params))
    est = hessian_trace(model, [(x, y)], n_samples=600, seed=3)
    assert abs(est["trace"] - exact) < 4 * est["std_err"] + 1e-6
    assert abs(est["trace"] - exact) / abs(exact) < 0.1


def test_power_iteration_finds_top_eigenvalue():
    lin, batches, c, _ = _linear_case(n_in=4)
    exact = float(np.linalg.eigvalsh(c)[-1])  # H's eigenvalues are those of C, each n_out times
    res = top_eigenvalue(lin, batches, n_iter=500, tol=1e-9, loss_fn=_half_mse)
    assert res["converged"]
    assert res["eigenvalue"] == pytest.approx(exact, rel=1e-4)


def test_noise_loss_increase_zero_without_noise_positive_with():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(128, 8)
    y = model(x).argmax(1).detach()  # a model that is right on its data: noise can only hurt on average
    batches = [(x, y)]
    zero = noise_loss_increase(model, batches, NoiseConfig(bits="W4A4", alpha=0.0), n_samples=2)
    assert zero["increase"] == 0.0
    coarse = noise_loss_increase(model, batches, NoiseConfig(bits="W2A2"), n_samples=8)
    fine = noise_loss_increase(model, batches, NoiseConfig(bits="W8A8"), n_samples=8)
    assert coarse["increase"] > fine["increase"] and coarse["increase"] > 0
    assert abs(fine["increase"]) < 1e-2
    assert model.training  # the mode is restored
