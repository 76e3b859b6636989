"""fused_nce.optim: the row optimizers against torch.optim on the same gradients, many steps."""

import copy

import pytest
import torch

import fused_nce
from fused_nce.optim import RowAdagrad, RowAdam, RowSGD, row_gradient
from helpers import make_problem

NUM_ROWS, DIM, STEPS = 40, 12, 12
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def touched_rows(step, generator):
    """About a third of the rows at random, with two planted patterns: row 0 is first touched at
    step 6 (state created late), row 1 only in even steps (lazy moments skip the odd ones)."""
    rows = set(torch.randperm(NUM_ROWS, generator=generator)[:NUM_ROWS // 3].tolist()) - {0, 1}
    if step >= 6:
        rows.add(0)
    if step % 2 == 0:
        rows.add(1)
    return sorted(rows)


def gradients(shapes, dtype, device, sparse, seed=0):
    """STEPS lists of one gradient per shape: sparse COO over the touched rows, or dense."""
    g = torch.Generator().manual_seed(seed)
    for step in range(STEPS):
        rows = torch.tensor(touched_rows(step, g))
        grads = []
        for shape in shapes:
            values = torch.randn(len(rows), *shape[1:], generator=g, dtype=torch.float64)
            grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape).coalesce()
            grad = grad.to(device=device, dtype=dtype)
            grads.append(grad if sparse else grad.to_dense())
        yield grads


def make_params(dtype, device, seed=1):
    """An output embedding [V, D] and its bias [V]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(NUM_ROWS, DIM, generator=g, dtype=torch.float64).to(device, dtype),
            torch.randn(NUM_ROWS, generator=g, dtype=torch.float64).to(device, dtype)]


def run(optimizer_factory, params, grads):
    """Steps the optimizer over the gradients; returns it (the params are updated in place)."""
    optimizer = optimizer_factory(params)
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def assert_same_run(ours, theirs, dtype, device, sparse, seed=0):
    ours_params, theirs_params = make_params(dtype, device), make_params(dtype, device)
    shapes = [p.shape for p in ours_params]
    run(ours, ours_params, gradients(shapes, dtype, device, sparse, seed))
    run(theirs, theirs_params, gradients(shapes, dtype, device, sparse, seed))
    initial = make_params(dtype, device)
    for p, q, p0 in zip(ours_params, theirs_params, initial):
        assert not torch.equal(p, p0)  # something happened
        torch.testing.assert_close(p, q, **TOL[dtype])
    return ours_params


DTYPES = [torch.float32, torch.float64]
LAYOUTS = pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@LAYOUTS
def test_sgd_matches_torch(device, dtype, sparse):
    # torch.optim.SGD decays every row for a sparse gradient: compare decay on dense gradients.
    weight_decay = 0.0 if sparse else 0.1
    assert_same_run(lambda ps: RowSGD(ps, lr=0.1, weight_decay=weight_decay),
                    lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=weight_decay),
                    dtype, device, sparse)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sgd_weight_decay_is_lazy(device, dtype):
    """With a sparse gradient, the rows present take torch's SGD step with decay; others stay."""
    params = make_params(dtype, device)
    expected = [p.clone() for p in params]
    shapes = [p.shape for p in params]
    run(lambda ps: RowSGD(ps, lr=0.1, weight_decay=0.3), params,
        gradients(shapes, dtype, device, True))
    for step_grads in gradients(shapes, dtype, device, True):
        for e, grad in zip(expected, step_grads):
            rows = grad.indices()[0]
            sub = e[rows].clone().requires_grad_()
            sub.grad = grad.values().clone()
            torch.optim.SGD([sub], lr=0.1, weight_decay=0.3).step()
            e[rows] = sub.detach()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("initial", [0.0, 0.5])
@LAYOUTS
def test_adagrad_matches_torch(device, dtype, initial, sparse):
    assert_same_run(lambda ps: RowAdagrad(ps, lr=0.5, initial_accumulator_value=initial),
                    lambda ps: torch.optim.Adagrad(ps, lr=0.5, initial_accumulator_value=initial),
                    dtype, device, sparse)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_matches_sparse_adam(device, dtype):
    ours = assert_same_run(lambda ps: RowAdam(ps, lr=0.05, betas=(0.8, 0.9), eps=1e-3),
                           lambda ps: torch.optim.SparseAdam(ps, lr=0.05, betas=(0.8, 0.9),
                                                             eps=1e-3),
                           dtype, device, sparse=True)
    assert ours[0].shape == (NUM_ROWS, DIM) and ours[1].shape == (NUM_ROWS,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_dense_gradient_matches_adam(device, dtype):
    # A large eps makes torch.optim.Adam's eps placement (added after bias correction) visible.
    assert_same_run(lambda ps: RowAdam(ps, lr=0.05, eps=0.1),
                    lambda ps: torch.optim.Adam(ps, lr=0.05, eps=0.1),
                    dtype, device, sparse=False)


def test_adam_moments_are_lazy(device):
    """Row 1 is touched only in even steps: its moments equal those of a run on those steps."""
    params = make_params(torch.float64, device)
    optimizer = run(lambda ps: RowAdam(ps, lr=0.01), params,
                    gradients([p.shape for p in params], torch.float64, device, True))
    state = optimizer.state[params[0]]
    assert state["step"] == STEPS
    m = torch.zeros(DIM, dtype=torch.float64, device=device)
    for step, (grad, _) in enumerate(gradients([p.shape for p in params], torch.float64, device,
                                               True)):
        rows = grad.indices()[0].tolist()
        assert (1 in rows) == (step % 2 == 0)
        if 1 in rows:
            m += 0.1 * (grad.values()[rows.index(1)] - m)
    torch.testing.assert_close(state["exp_avg"][1], m, rtol=1e-12, atol=1e-12)
    # Row 0 has a gradient from step 6 on only: six steps of moments, none before.
    assert state["exp_avg_sq"][0].abs().min() > 0


def rowwise_adagrad_reference(params, grads, lr, eps, initial):
    sums = [torch.full(p.shape[:1], initial, dtype=p.dtype, device=p.device) for p in params]
    for step_grads in grads:
        for p, s, grad in zip(params, sums, step_grads):
            if grad.is_sparse:
                rows, values = grad.indices()[0], grad.values()
            else:
                rows, values = torch.arange(p.shape[0], device=p.device), grad
            square = values.pow(2).reshape(len(rows), -1).mean(1)
            s[rows] += square
            denom = (s[rows].sqrt() + eps).reshape(-1, *[1] * (p.dim() - 1))
            p[rows] -= lr * values / denom
    return sums


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@LAYOUTS
def test_rowwise_adagrad_matches_reference(device, dtype, sparse):
    params, expected = make_params(dtype, device), make_params(dtype, device)
    shapes = [p.shape for p in params]
    optimizer = run(lambda ps: RowAdagrad(ps, lr=0.5, eps=1e-6, initial_accumulator_value=0.1,
                                          rowwise=True),
                    params, gradients(shapes, dtype, device, sparse))
    sums = rowwise_adagrad_reference(expected, gradients(shapes, dtype, device, sparse), 0.5, 1e-6,
                                     0.1)
    for p, e, s in zip(params, expected, sums):
        state_sum = optimizer.state[p]["sum"]
        assert state_sum.shape == (NUM_ROWS,)  # one accumulator per row
        torch.testing.assert_close(state_sum, s, **TOL[dtype])
        torch.testing.assert_close(p, e, **TOL[dtype])


def low_precision_reference(name, params, grads, lr):
    """Each rule in float32 on float32 state, the parameter rounded to its dtype every step."""
    state = [dict(m=torch.zeros_like(p, dtype=torch.float32),
                  v=torch.zeros_like(p, dtype=torch.float32)) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        for p, s, grad in zip(params, state, step_grads):
            rows, g = grad.indices()[0], grad.values().float()
            w = p[rows].float()
            if name == "sgd":
                w = w - lr * g
            elif name == "adagrad":
                s["v"][rows] += g * g
                w = w - lr * (g / (s["v"][rows].sqrt() + 1e-10))
            else:
                m = s["m"][rows] + (g - s["m"][rows]) * (1 - 0.9)
                v = s["v"][rows] + (g * g - s["v"][rows]) * (1 - 0.999)
                s["m"][rows], s["v"][rows] = m, v
                step_size = lr * (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t)
                w = w - step_size * (m / (v.sqrt() + 1e-8))
            p[rows] = w.to(p.dtype)
    return state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_low_precision_params_with_float32_state(device, dtype, name):
    factory = dict(sgd=lambda ps: RowSGD(ps, lr=0.05), adagrad=lambda ps: RowAdagrad(ps, lr=0.05),
                   adam=lambda ps: RowAdam(ps, lr=0.05))[name]
    params, expected = make_params(dtype, device), make_params(dtype, device)
    shapes = [p.shape for p in params]
    optimizer = run(factory, params, gradients(shapes, dtype, device, True))
    state = low_precision_reference(name, expected, gradients(shapes, dtype, device, True), 0.05)
    ulp = torch.finfo(dtype).eps
    for p, e, s in zip(params, expected, state):
        assert p.dtype == dtype
        # Float32 math and state: at most a rounding step apart, never drifting apart.
        torch.testing.assert_close(p.float(), e.float(), rtol=2 * ulp, atol=2 * ulp)
        if name == "adagrad":
            assert optimizer.state[p]["sum"].dtype == torch.float32
            torch.testing.assert_close(optimizer.state[p]["sum"], s["v"], rtol=1e-6, atol=1e-6)
        if name == "adam":
            for key, ref in [("exp_avg", s["m"]), ("exp_avg_sq", s["v"])]:
                assert optimizer.state[p][key].dtype == torch.float32
                torch.testing.assert_close(optimizer.state[p][key], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("factory", [
    lambda ps: RowAdam(ps, lr=0.05),
    lambda ps: RowAdagrad(ps, lr=0.5, rowwise=True),
    lambda ps: RowAdagrad(ps, lr=0.5),
], ids=["adam", "adagrad_rowwise", "adagrad"])
def test_state_dict_round_trip(device, dtype, factory):
    """Saved after some steps and loaded into a fresh optimizer, the run goes on identically."""
    params = make_params(dtype, device)
    shapes = [p.shape for p in params]
    grads = list(gradients(shapes, dtype, device, True))
    optimizer = run(factory, params, grads[:5])
    saved = copy.deepcopy(optimizer.state_dict())
    resumed_params = [p.clone() for p in params]
    resumed = factory(resumed_params)
    resumed.load_state_dict(saved)
    for p in resumed_params:
        for key, value in resumed.state[p].items():
            if isinstance(value, torch.Tensor):  # float32 state stays float32 for bf16 params
                assert value.dtype == fused_nce.optim.state_dtype(p)
    for opt, ps in [(optimizer, params), (resumed, resumed_params)]:
        for step_grads in grads[5:]:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(params, resumed_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_uncoalesced_and_fully_sparse_gradients(device):
    """Duplicate rows are summed first; a gradient sparse in both dimensions is gathered to rows."""
    ref, dup, full, unflagged = (make_params(torch.float64, device)[:1] for _ in range(4))
    rows = torch.tensor([[3, 7, 3, 9]])
    values = torch.randn(4, DIM, dtype=torch.float64)
    grad = torch.sparse_coo_tensor(rows, values, (NUM_ROWS, DIM)).to(device)
    assert not grad.is_coalesced()
    coalesced = grad.coalesce()
    # Unique ascending rows without the coalesced flag (what accumulation into .grad leaves).
    same = torch.sparse_coo_tensor(coalesced.indices(), coalesced.values(), (NUM_ROWS, DIM))
    assert not same.is_coalesced()
    for params, g in [(ref, coalesced), (dup, grad), (full, grad.to_dense().to_sparse()),
                      (unflagged, same)]:
        params[0].grad = g
        RowAdam(params, lr=0.1).step()
    assert full[0].grad.sparse_dim() == 2
    torch.testing.assert_close(dup[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(full[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(unflagged[0], ref[0], rtol=0, atol=0)


def test_training_with_sparse_grad_matches_sparse_adam(device):
    """The whole path: nce_loss(sparse_grad=True) gradients, RowAdam vs torch.optim.SparseAdam."""
    p = make_problem(n=31, num_classes=300, dim=16, dtype=torch.float64, device=device)
    runs = []
    for cls in [RowAdam, torch.optim.SparseAdam]:
        hidden, weight, bias = p.leaves()
        optimizer = cls([weight, bias], lr=0.01)
        for _ in range(4):
            optimizer.zero_grad()
            fused_nce.nce_loss(hidden, weight, bias, p.target, p.sampler, negatives=p.negatives,
                               sparse_grad=True).backward()
            optimizer.step()
        runs.append((weight, bias))
    for ours, theirs in zip(*runs):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def opcheck_cases(device, dtype):
    param = torch.randn(NUM_ROWS, DIM, device=device, dtype=dtype)
    state = torch.rand(NUM_ROWS, DIM, device=device, dtype=fused_nce.optim.state_dtype(param))
    rows = torch.tensor([0, 5, 6, 39], device=device)
    grad = torch.randn(4, DIM, device=device, dtype=dtype)
    ops = torch.ops.fused_nce
    for r, g in [(rows, grad), (None, torch.randn_like(param))]:
        yield ops.row_sgd_step, (param.clone(), r, g, 0.1, 0.01)
        yield ops.row_adagrad_step, (param.clone(), state.clone(), r, g, 0.1, 1e-10, False)
        yield ops.row_adagrad_step, (param.clone(), state[:, 0].clone(), r, g, 0.1, 1e-10, True)
        yield ops.row_adam_step, (param.clone(), state.clone(), state.clone(), r, g, 0.1, 0.9,
                                  0.999, 1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    for op, args in opcheck_cases(device, dtype):
        torch.library.opcheck(op, args)


def test_bad_hyperparameters():
    params = make_params(torch.float32, "cpu")
    with pytest.raises(ValueError, match="lr"):
        RowSGD(params, lr=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        RowSGD(params, lr=0.1, weight_decay=-1.0)
    with pytest.raises(ValueError, match="eps"):
        RowAdagrad(params, eps=-1.0)
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        RowAdagrad(params, initial_accumulator_value=-1.0)
    with pytest.raises(TypeError, match="rowwise"):
        RowAdagrad(params, rowwise="yes")
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        RowAdam(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        RowAdam(params, lr=float("nan"))
    with pytest.raises(TypeError, match="lr"):
        RowAdam(params, lr="0.1")


def test_bad_params():
    with pytest.raises(ValueError, match="params.*0-dim"):
        RowAdam([torch.zeros((), requires_grad=True)])
    with pytest.raises(TypeError, match="params.*float"):
        RowSGD([torch.zeros(3, dtype=torch.int64)], lr=0.1)
    with pytest.raises(TypeError, match="params.*strided"):
        RowSGD([torch.zeros(3, 2).to_sparse()], lr=0.1)
    with pytest.raises(ValueError, match="params.*CPU or CUDA"):
        RowSGD([torch.zeros(3, 2, device="meta")], lr=0.1)
    optimizer = RowSGD([torch.zeros(3, 2)], lr=0.1)
    with pytest.raises(ValueError, match="params.*contiguous"):
        optimizer.add_param_group(dict(params=[torch.zeros(2, 3).t()]))


def test_bad_gradients():
    param = torch.zeros(NUM_ROWS, DIM)
    with pytest.raises(ValueError, match="grad.*device"):
        row_gradient(param, torch.zeros(NUM_ROWS, DIM, device="meta"))
    with pytest.raises(ValueError, match="grad.*shape"):
        row_gradient(param, torch.zeros(NUM_ROWS, DIM + 1))
    with pytest.raises(TypeError, match="grad.*dtype"):
        row_gradient(param, torch.zeros(NUM_ROWS, DIM, dtype=torch.float64))
    with pytest.raises(TypeError, match="grad.*layout"):
        row_gradient(param, torch.zeros(NUM_ROWS, DIM).to_sparse_csr())


def test_bad_rows_are_refused_before_any_write():
    param = torch.randn(NUM_ROWS, DIM)
    before = param.clone()
    grad = torch.ones(2, DIM)
    # Out of range at the end: the rows before it must not have been written either.
    for rows, error in [([3, NUM_ROWS], IndexError), ([-1, 3], IndexError), ([5, 3], ValueError),
                        ([3, 3], ValueError)]:
        with pytest.raises(error, match="row"):
            torch.ops.fused_nce.row_sgd_step(param, torch.tensor(rows), grad, 0.1, 0.0)
        torch.testing.assert_close(param, before, rtol=0, atol=0)
    # The same through the optimizer, with a gradient built without its invariants checked.
    p = param.clone().requires_grad_()
    p.grad = torch.sparse_coo_tensor(torch.tensor([[2, NUM_ROWS + 5]]), grad, (NUM_ROWS, DIM),
                                     is_coalesced=True, check_invariants=False)
    with pytest.raises(IndexError, match="row index"):
        RowAdam([p]).step()
    torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)


def test_bad_state():
    param = torch.randn(NUM_ROWS, DIM, dtype=torch.bfloat16)
    grad = torch.randn(NUM_ROWS, DIM, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="state_sum must be Float"):
        torch.ops.fused_nce.row_adagrad_step(param, torch.zeros_like(param), None, grad, 0.1, 0.0,
                                             False)
    with pytest.raises(ValueError, match="state_sum must have shape"):
        torch.ops.fused_nce.row_adagrad_step(param, torch.zeros(NUM_ROWS, DIM), None, grad, 0.1,
                                             0.0, True)
