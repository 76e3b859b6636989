"""Tests of fused_nce.log_partition and fused_nce.init_output_bias_."""

import math

import pytest
import torch
import torch.nn.functional as F

import fused_nce


def make_inputs(device, dtype=torch.float32, shape=(9,), num_classes=37, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(num_classes, generator=gen, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (hidden, weight, bias)]


def exact(hidden, weight, bias):
    """float64 logsumexp of the full [N, V] logits."""
    logits = F.linear(hidden.double().reshape(-1, hidden.shape[-1]), weight.double(),
                      bias.double() if bias is not None else None)
    return torch.logsumexp(logits, dim=1)


@pytest.mark.parametrize("with_bias", [True, False])
def test_log_partition_equals_logsumexp_of_full_logits(device, with_bias):
    hidden, weight, bias = make_inputs(device)
    bias = bias if with_bias else None
    log_z = fused_nce.log_partition(hidden, weight, bias)
    assert log_z.shape == (9,) and log_z.dtype == torch.float32 and log_z.device.type == device.type
    torch.testing.assert_close(log_z.double(), exact(hidden, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 100, None])
def test_chunking_does_not_change_the_result(device, chunk_size):
    hidden, weight, bias = make_inputs(device, torch.float64)
    log_z = fused_nce.log_partition(hidden, weight, bias, chunk_size=chunk_size)
    torch.testing.assert_close(log_z, exact(hidden, weight, bias), rtol=1e-12, atol=1e-12)


def test_leading_dims_are_flattened(device):
    hidden, weight, bias = make_inputs(device, shape=(2, 3, 4))
    log_z = fused_nce.log_partition(hidden, weight, bias, chunk_size=10)
    assert log_z.shape == (24,)
    torch.testing.assert_close(log_z.double(), exact(hidden, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,expected", [(torch.float64, torch.float64),
                                            (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.float32),
                                            (torch.float16, torch.float32)])
def test_result_dtype_and_accuracy(device, dtype, expected):
    hidden, weight, bias = make_inputs(device, dtype)
    log_z = fused_nce.log_partition(hidden, weight, bias, chunk_size=8)
    assert log_z.dtype == expected
    # The reference sees the same rounded inputs; only the accumulation may differ.
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(log_z.double(), exact(hidden, weight, bias), rtol=tol, atol=tol)


def test_float64_bias_promotes_the_accumulation(device):
    hidden, weight, bias = make_inputs(device)
    log_z = fused_nce.log_partition(hidden, weight, bias.double())
    assert log_z.dtype == torch.float64


def test_large_scores_stay_finite(device):
    hidden, weight, bias = make_inputs(device)
    log_z = fused_nce.log_partition(hidden * 1e3, weight, bias, chunk_size=4)
    assert torch.isfinite(log_z).all()
    torch.testing.assert_close(log_z.double(), exact(hidden * 1e3, weight, bias), rtol=1e-5,
                               atol=1e-2)


def test_row_sample_is_a_reproducible_subset(device):
    hidden, weight, bias = make_inputs(device, torch.float64, shape=(50,))
    everything = exact(hidden, weight, bias)

    def sample(seed):
        gen = torch.Generator(device).manual_seed(seed)
        return fused_nce.log_partition(hidden, weight, bias, num_rows=7, generator=gen)

    first = sample(0)
    assert first.shape == (7,)
    torch.testing.assert_close(first, sample(0), rtol=0, atol=0)
    assert not torch.equal(first, sample(1))
    # Every sampled value is one of the rows' exact values, and no row is drawn twice.
    match = (first[:, None] - everything[None, :]).abs() < 1e-9
    assert bool((match.sum(1) == 1).all())
    assert len(set(match.int().argmax(1).tolist())) == 7


def test_row_sample_larger_than_n_keeps_every_row(device):
    hidden, weight, bias = make_inputs(device)
    torch.testing.assert_close(fused_nce.log_partition(hidden, weight, bias, num_rows=100),
                               fused_nce.log_partition(hidden, weight, bias))


def test_no_gradient_is_recorded():
    hidden, weight, bias = make_inputs("cpu")
    weight.requires_grad_(True)
    assert not fused_nce.log_partition(hidden, weight, bias).requires_grad


@pytest.mark.parametrize("change,error,name", [
    (dict(hidden=[1.0, 2.0]), TypeError, "hidden"),
    (dict(hidden=torch.ones(3, 8, dtype=torch.int64)), TypeError, "hidden"),
    (dict(hidden=torch.tensor(1.0)), ValueError, "hidden"),
    (dict(weight=torch.ones(37, 7)), ValueError, "weight"),
    (dict(weight=torch.ones(37)), ValueError, "weight"),
    (dict(weight=torch.ones(0, 8)), ValueError, "weight"),
    (dict(bias=torch.ones(36)), ValueError, "bias"),
    (dict(bias=torch.ones(37, dtype=torch.int64)), TypeError, "bias"),
    (dict(num_rows=0), ValueError, "num_rows"),
    (dict(num_rows=2.5), ValueError, "num_rows"),
    (dict(num_rows=True), ValueError, "num_rows"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=-3), ValueError, "chunk_size"),
    (dict(generator=0), TypeError, "generator"),
])
def test_bad_arguments_raise_naming_the_argument(change, error, name):
    hidden, weight, bias = make_inputs("cpu")
    kwargs = dict(hidden=hidden, weight=weight, bias=bias, num_rows=None, chunk_size=16)
    kwargs.update(change)
    with pytest.raises(error, match=name):
        fused_nce.log_partition(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("bias"),
                                **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_raises():
    hidden, weight, bias = make_inputs("cpu")
    with pytest.raises(ValueError, match="weight"):
        fused_nce.log_partition(hidden, weight.cuda(), None)
    with pytest.raises(ValueError, match="bias"):
        fused_nce.log_partition(hidden, weight, bias.cuda())


@pytest.mark.parametrize("num_classes", [1, 10, 50_000])
def test_init_output_bias_gives_log_z_zero_for_zero_weights(device, num_classes):
    decoder = torch.nn.Linear(16, num_classes).to(device)
    torch.nn.init.zeros_(decoder.weight)
    returned = fused_nce.init_output_bias_(decoder.bias)
    assert returned is decoder.bias and decoder.bias.requires_grad
    torch.testing.assert_close(decoder.bias, torch.full_like(decoder.bias, -math.log(num_classes)))
    hidden = torch.randn(5, 16, device=device)
    log_z = fused_nce.log_partition(hidden, decoder.weight, decoder.bias, chunk_size=4096)
    assert log_z.abs().max() < 1e-4


def test_init_output_bias_keeps_log_z_near_zero_for_small_weights():
    decoder = torch.nn.Linear(64, 20_000)
    torch.nn.init.normal_(decoder.weight, std=0.01)
    fused_nce.init_output_bias_(decoder.bias)
    log_z = fused_nce.log_partition(torch.randn(100, 64), decoder.weight, decoder.bias)
    assert log_z.abs().max() < 0.05


def test_init_output_bias_bad_arguments():
    with pytest.raises(TypeError, match="bias"):
        fused_nce.init_output_bias_([0.0, 1.0])
    with pytest.raises(TypeError, match="bias"):
        fused_nce.init_output_bias_(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="bias"):
        fused_nce.init_output_bias_(torch.zeros(0))
