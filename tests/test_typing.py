"""The package ships type hints: py.typed, and every public function and method annotated."""

import inspect
import pathlib
import typing

import pytest

import fused_nce

PUBLIC = [fused_nce.nce_loss, fused_nce.negative_sampling_loss, fused_nce.sampled_softmax_loss,
          fused_nce.full_softmax_loss, fused_nce.unigram_weights, fused_nce.log_uniform_weights,
          fused_nce.AliasSampler.__init__, fused_nce.AliasSampler.sample, fused_nce.AliasSampler.to,
          fused_nce.AliasSampler.from_tables, fused_nce.NCELoss.__init__, fused_nce.NCELoss.forward,
          *[getattr(fused_nce.reference, f"{name}_loss") for name in
            ["nce", "negative_sampling", "sampled_softmax", "full_softmax"]]]


def test_py_typed_marker_is_shipped():
    assert (pathlib.Path(fused_nce.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda fn: fn.__qualname__)
def test_public_api_is_annotated(fn):
    hints = typing.get_type_hints(fn)  # also checks that every annotation resolves
    params = [name for name in inspect.signature(fn).parameters if name not in ("self", "cls")]
    assert set(params) <= set(hints), set(params) - set(hints)
    assert "return" in hints


def test_sparse_grad_is_a_keyword_of_every_sampled_loss():
    for fn in PUBLIC[:3] + [fused_nce.NCELoss.__init__]:
        parameter = inspect.signature(fn).parameters["sparse_grad"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is False
