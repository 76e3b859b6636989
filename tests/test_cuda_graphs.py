"""CUDA graphs: a captured training step, sampling included, replays correctly."""

import pytest
import torch

import fused_nce

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

V, D, N, K = 500, 32, 64, 8


def capture(fn):
    """Warms fn up on a side stream (as CUDA graph capture requires), then captures one call;
    returns (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def test_captured_training_step_replays():
    device = torch.device("cuda")
    torch.manual_seed(0)
    sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(V), device=device)
    hidden = torch.randn(N, D, device=device)
    weight = torch.nn.Parameter(torch.randn(V, D, device=device) * 0.1)
    bias = torch.nn.Parameter(torch.zeros(V, device=device))
    target = torch.randint(V, (N,), device=device)
    optimizer = torch.optim.SGD([weight, bias], lr=0.1)

    def step():
        optimizer.zero_grad(set_to_none=False)
        negatives = sampler.sample((N, K))
        loss = fused_nce.sampled_softmax_loss(hidden, weight, bias, target, sampler,
                                              negatives=negatives)
        loss.backward()
        optimizer.step()
        return negatives, loss

    graph, (static_negatives, static_loss) = capture(step)

    seen = []
    for _ in range(3):
        before = (weight.detach().clone(), bias.detach().clone())
        graph.replay()
        torch.cuda.synchronize()
        negatives = static_negatives.clone()
        assert 0 <= negatives.min() and negatives.max() < V
        seen.append(negatives)
        # The replay equals an eager step from the same parameters with the drawn negatives.
        w, b = (t.clone().requires_grad_() for t in before)
        loss = fused_nce.sampled_softmax_loss(hidden, w, b, target, sampler, negatives=negatives)
        loss.backward()
        torch.testing.assert_close(static_loss, loss.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(weight.detach(), before[0] - 0.1 * w.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias.detach(), before[1] - 0.1 * b.grad, rtol=1e-5, atol=1e-6)
    # Every replay draws fresh negatives.
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


def test_captured_module_loss_draws_fresh_negatives():
    """NCELoss sampling inside the loss, captured: replays give different, finite losses whose
    average is close to the eager average."""
    device = torch.device("cuda")
    torch.manual_seed(1)
    crit = fused_nce.NCELoss(V, fused_nce.log_uniform_weights(V), K).to(device)
    hidden = torch.randn(N, D, device=device)
    weight = torch.randn(V, D, device=device) * 0.1
    target = torch.randint(V, (N,), device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        crit(hidden, weight, None, target)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = crit(hidden, weight, None, target)
    replayed = []
    for _ in range(200):
        graph.replay()
        replayed.append(static_loss.item())
    eager = [crit(hidden, weight, None, target).item() for _ in range(200)]
    assert len(set(replayed)) > 150
    mean = sum(eager) / len(eager)
    spread = (sum((x - mean) ** 2 for x in eager) / len(eager)) ** 0.5
    # Two means of 200 draws each: their difference is within 5 standard errors.
    assert abs(sum(replayed) / len(replayed) - mean) < 5 * spread * (2 / len(eager)) ** 0.5


def test_captured_step_with_a_frozen_output_layer():
    """Only hidden learns: the grad_hidden-only backward (no sort, no host sync) is captured and
    replays the eager gradient."""
    torch.manual_seed(2)
    sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(V), device="cuda")
    hidden = torch.randn(N, D, device="cuda", requires_grad=True)
    weight = torch.randn(V, D, device="cuda") * 0.1
    target = torch.randint(V, (N,), device="cuda")
    negatives = sampler.sample((N, K))

    def step():
        hidden.grad = None
        loss = fused_nce.nce_loss(hidden, weight, None, target, sampler, negatives=negatives)
        loss.backward()
        return hidden.grad

    graph, static_grad = capture(step)
    hidden.data.mul_(1.5)
    graph.replay()
    torch.cuda.synchronize()
    (expected,) = torch.autograd.grad(
        fused_nce.nce_loss(hidden, weight, None, target, sampler, negatives=negatives), hidden)
    torch.testing.assert_close(static_grad, expected)


def test_captured_loss_with_noise_weights_builds_its_table_on_the_device():
    """noise= a weights tensor builds the alias table inside the captured region: the build has
    no host sync (device-side checks, a scan-based partition), so it is captured too."""
    torch.manual_seed(3)
    noise = fused_nce.log_uniform_weights(V).cuda()
    hidden = torch.randn(N, D, device="cuda")
    weight = torch.randn(V, D, device="cuda") * 0.1
    target = torch.randint(V, (N,), device="cuda")

    def step():
        return fused_nce.sampled_softmax_loss(hidden, weight, None, target, noise,
                                              num_negatives=K)

    graph, static_loss = capture(step)
    values = []
    for _ in range(20):
        graph.replay()
        values.append(static_loss.item())
    assert len(set(values)) > 10 and all(v == v and abs(v) < 1e4 for v in values)
    eager = sum(step().item() for _ in range(200)) / 200
    assert abs(sum(values) / len(values) - eager) < 0.5 * abs(eager) + 0.5


def test_sparse_grad_under_capture_is_a_clear_error():
    """sparse_grad's output size (the touched rows) is known only on the device: capturing it is
    refused with a message that says what to do, not a cryptic CUDA error."""
    sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(V), device="cuda")
    hidden = torch.randn(N, D, device="cuda")
    weight = torch.randn(V, D, device="cuda", requires_grad=True)
    target = torch.randint(V, (N,), device="cuda")
    negatives = sampler.sample((N, K))

    def step():
        loss = fused_nce.nce_loss(hidden, weight, None, target, sampler, negatives=negatives,
                                  sparse_grad=True)
        loss.backward()

    step()  # eager: fine
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="sparse_grad=True cannot run inside a CUDA graph"):
        with torch.cuda.graph(graph):
            step()
