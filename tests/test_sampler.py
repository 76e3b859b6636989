"""The alias sampler: exact frequencies, reproducibility, the noise weight helpers."""

import pytest
import torch

import fused_nce
from helpers import chi_square, chi_square_p_upper, table_error_bound, table_probs


@pytest.mark.parametrize("kind", ["zipf", "uniform", "spiky"])
def test_frequencies_match_probs(device, kind):
    num_classes = 1000
    ranks = torch.arange(num_classes, dtype=torch.float64)
    weights = {
        "zipf": fused_nce.log_uniform_weights(num_classes),
        "uniform": torch.ones(num_classes),
        "spiky": torch.where(ranks % 97 == 0, 1000.0, 1.0) * (ranks % 5 != 0),
    }[kind]
    sampler = fused_nce.AliasSampler(weights, device=device)
    torch.testing.assert_close(sampler.probs.double().cpu(), weights.double() / weights.sum(),
                               rtol=1e-6, atol=0)
    draws = sampler.sample(2_000_000, generator=torch.Generator(device).manual_seed(1))
    statistic, dof = chi_square(draws, sampler.probs)
    assert chi_square_p_upper(statistic, dof) > 1e-4, (statistic, dof)
    if kind == "spiky":
        assert not bool((draws.cpu() % 5 == 0).any()), "a zero-weight class was drawn"


@pytest.mark.parametrize("kind", ["zipf", "uniform", "one_heavy", "zeros", "exact_ones", "random",
                                  "all_light"])
def test_table_encodes_the_weights_exactly(device, kind):
    """Every class keeps its exact mass in the table, whatever the mix of light and heavy classes."""
    num_classes = 100_003
    gen = torch.Generator().manual_seed(0)
    weights = {
        "zipf": fused_nce.log_uniform_weights(num_classes),
        "uniform": torch.ones(num_classes, dtype=torch.float64),
        "one_heavy": torch.cat([torch.full((1,), 1e6), torch.ones(num_classes - 1)]).double(),
        "zeros": torch.rand(num_classes, generator=gen, dtype=torch.float64)
        * (torch.rand(num_classes, generator=gen) < 0.1),
        "exact_ones": torch.tensor([2.0, 1.0, 0.0, 1.0] * 25000 + [1.0, 1.0, 1.0]).double(),
        "random": torch.rand(num_classes, generator=gen, dtype=torch.float64) ** 8,
        # Equal weights whose scaled values all round to just below 1: no heavy class at all.
        "all_light": torch.full((num_classes,), 0.1, dtype=torch.float64),
    }[kind]
    if kind == "all_light":
        assert bool((weights * num_classes / weights.sum() < 1).all())
    table = fused_nce.AliasSampler(weights, device=device).table
    assert table.dtype == torch.int64 and table.shape == (num_classes,)
    alias = table.cpu() >> 32
    assert bool(((alias >= 0) & (alias < num_classes)).all())
    # A class of weight zero is never the alias of a bucket that can hand out mass.
    keep = table.cpu() & 0xFFFFFFFF
    gives = keep < 0xFFFFFFFF
    assert not bool((weights[alias[gives]] == 0).any())
    error = (table_probs(table) - weights / weights.sum()).abs()
    bound = table_error_bound(table)
    assert bool((error <= bound).all()), (error / bound).max().item()


def test_chi_square_detects_a_wrong_distribution(device):
    """The frequency test above has teeth: a slightly wrong distribution fails it."""
    weights = torch.ones(1000)
    draws = fused_nce.AliasSampler(weights, device=device).sample(
        2_000_000, generator=torch.Generator(device).manual_seed(1))
    wrong = weights.clone()
    wrong[:50] *= 1.1
    statistic, dof = chi_square(draws, wrong / wrong.sum())
    assert chi_square_p_upper(statistic, dof) < 1e-4


def test_draws_are_reproducible(device):
    sampler = fused_nce.AliasSampler(torch.rand(100) + 0.01, device=device)
    torch.manual_seed(3)
    a = sampler.sample((4, 5))
    torch.manual_seed(3)
    b = sampler.sample((4, 5))
    c = sampler.sample((4, 5))
    assert a.shape == (4, 5) and a.dtype == torch.int64 and a.device == sampler.device
    assert torch.equal(a, b) and not torch.equal(b, c)
    g = torch.Generator(device).manual_seed(11)
    d = sampler.sample(20, generator=g)
    g.manual_seed(11)
    assert torch.equal(d, sampler.sample(20, generator=g))


def test_draws_do_not_depend_on_thread_count():
    sampler = fused_nce.AliasSampler(torch.rand(5000))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in [1, threads]:
            torch.set_num_threads(n)
            results.append(sampler.sample(100_000, generator=torch.Generator().manual_seed(5)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_cpu_draws_are_pinned():
    """The CPU stream for a seed stays what it was: draws recorded from the portable Philox loop
    (philox4x32_10 in nce_math.h). The AVX2 Philox, taken where the CPU has it, must give the same
    draws, so a seed reproduces them on any x86-64 CPU."""
    sampler = fused_nce.AliasSampler(torch.arange(1, 1001, dtype=torch.float64))
    torch.manual_seed(2026)
    draws = sampler.sample((3, 4099)).flatten()
    assert draws[:5].tolist() == [560, 963, 734, 824, 979]
    assert draws[-3:].tolist() == [919, 585, 858]
    assert int((draws * torch.arange(1, draws.numel() + 1)).sum()) == 50002432166
    explicit = sampler.sample((77,), generator=torch.Generator().manual_seed(7))
    assert explicit[:6].tolist() == [691, 530, 680, 932, 237, 923]
    assert int(explicit.sum()) == 50797


def test_single_class_and_empty_draws(device):
    sampler = fused_nce.AliasSampler(torch.tensor([2.5]), device=device)
    assert sampler.num_classes == 1
    assert torch.equal(sampler.sample(10).cpu(), torch.zeros(10, dtype=torch.int64))
    assert sampler.sample((0, 3)).shape == (0, 3)


def test_sampler_moves_and_keeps_its_table():
    sampler = fused_nce.AliasSampler(torch.rand(50))
    moved = sampler.to("cpu")
    assert torch.equal(moved.table, sampler.table) and moved.device == torch.device("cpu")
    assert "num_classes=50" in repr(sampler)


def test_tiny_probabilities_are_kept():
    weights = torch.tensor([1e-35, 1.0, 0.0, 3.0], dtype=torch.float64)
    sampler = fused_nce.AliasSampler(weights)
    assert sampler.probs[0].item() > 0 and sampler.probs[2].item() == 0.0
    draws = sampler.sample(100_000)
    assert not bool((draws == 2).any())


def test_noise_weight_helpers():
    counts = torch.tensor([10.0, 0.0, 3.0])
    torch.testing.assert_close(fused_nce.unigram_weights(counts),
                               counts.double() ** 0.75)
    torch.testing.assert_close(fused_nce.unigram_weights(counts, power=1.0), counts.double())
    w = fused_nce.log_uniform_weights(4)
    torch.testing.assert_close(w, torch.tensor([2 / 1, 3 / 2, 4 / 3, 5 / 4]).double().log())
    with pytest.raises(ValueError, match="counts"):
        fused_nce.unigram_weights(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="num_classes"):
        fused_nce.log_uniform_weights(0)


@pytest.mark.parametrize("weights, error, message", [
    (torch.tensor([1.0, -0.5]), ValueError, "non-negative"),
    (torch.tensor([1.0, float("nan")]), ValueError, "finite"),
    (torch.tensor([1.0, float("inf")]), ValueError, "finite"),
    (torch.zeros(3), ValueError, "all be zero"),
    (torch.ones(2, 2), ValueError, "1-D"),
    (torch.ones(0), ValueError, "non-empty"),
    ([1.0, 2.0], TypeError, "Tensor"),
    (torch.ones(3, dtype=torch.bool), TypeError, "real"),
])
def test_bad_weights(weights, error, message):
    with pytest.raises(error, match=message):
        fused_nce.AliasSampler(weights)


def test_bad_sample_size():
    sampler = fused_nce.AliasSampler(torch.ones(3))
    with pytest.raises(ValueError, match="size"):
        sampler.sample(-1)
