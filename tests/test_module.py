"""NCELoss: owns its sampler (buffers), optional learned log_z, trains a model."""

import pytest
import torch

import fused_nce
from conftest import OBJECTIVES
from helpers import make_problem


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("shared", [False, True], ids=["per_example", "shared"])
def test_module_equals_functional(device, objective, shared):
    p = make_problem(device=device)
    weights = torch.rand(p.weight.shape[0]) + 0.1
    crit = fused_nce.NCELoss(p.weight.shape[0], weights, 6, objective=objective,
                             shared_negatives=shared).to(device)
    torch.manual_seed(5)
    loss = crit(p.hidden, p.weight, p.bias, p.target)
    torch.manual_seed(5)
    fn = getattr(fused_nce, f"{objective}_loss")
    expected = fn(p.hidden, p.weight, p.bias, p.target, fused_nce.AliasSampler(weights, device=device),
                  num_negatives=6, shared_negatives=shared)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def test_state_dict_round_trip_and_to():
    weights = torch.arange(1, 31, dtype=torch.float32)
    crit = fused_nce.NCELoss(30, weights, 4, learn_log_z=True)
    state = crit.state_dict()
    assert set(state) == {"noise_probs", "noise_table", "log_z"}
    other = fused_nce.NCELoss(30, torch.ones(30), 4, learn_log_z=True)
    other.load_state_dict(state)
    g = torch.Generator().manual_seed(0)
    a = crit.sampler.sample(1000, generator=g)
    g.manual_seed(0)
    assert torch.equal(a, other.sampler.sample(1000, generator=g))
    moved = crit.to(torch.float64)  # casts floating buffers; the alias table stays int64
    assert moved.noise_table.dtype == torch.int64
    hidden, weight = torch.randn(3, 5, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64)
    assert torch.isfinite(moved(hidden, weight, None, torch.tensor([0, 5, 29])))
    assert "objective='nce'" in repr(crit)


def test_learned_log_z_gets_a_gradient_and_trains():
    torch.manual_seed(0)
    num_classes, dim = 50, 16
    crit = fused_nce.NCELoss(num_classes, torch.ones(num_classes), 8, learn_log_z=True)
    model = torch.nn.Embedding(num_classes, dim)
    out = torch.nn.Linear(dim, num_classes)
    params = [*model.parameters(), *out.parameters(), *crit.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    context = torch.randint(num_classes, (256,))
    target = (context * 7 + 3) % num_classes  # a deterministic mapping to learn
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = crit(model(context), out.weight, out.bias, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert crit.log_z.grad is not None
    assert losses[-1] < 0.3 * losses[0]
    accuracy = (torch.argmax(model(context) @ out.weight.T + out.bias, -1) == target).float().mean()
    assert accuracy > 0.9
