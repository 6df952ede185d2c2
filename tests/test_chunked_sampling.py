"""``cdds_fast.chunked_sampling``: the reference backend's related sampling over bounded chunks of
pairs. It must be the reference's function (values and every gradient), never hold more than one
chunk's ``[D, D]`` matrices, and be the reference's exact computation when one chunk covers the
batch."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cdds_fast.chunked_sampling as chunked
from cdds_fast import reference as R
from cdds_fast.contract import LOSS_KEYS
from cdds_fast.functional import cdds_loss
from tests._inputs import loss_kwargs, make_inputs
from tests.test_fused_loss import (
    LEAF_NAMES,
    N_ORDERS,
    assert_compiled_matches_eager,
    repair_alpha,
    run_reference_perturbed,
)

F64 = torch.float64
STAT_NAMES = ("mu_v", "s_v", "mu_t", "s_t", "alpha_image", "alpha_text")

#: Accuracy against float64: the chunked path may be this many times further from float64 than
#: the unchunked reference in the same dtype, plus :func:`_floor`. It computes every pair with the
#: same ops as the reference, but reductions over a sliced batch may be split differently (the
#: backward's sums over a matrix's rows are), and the alphas' gradients add their pairs' terms
#: chunk by chunk: the same rounding error, in another order. The chain 1/Z, softmax, 1/(D std)
#: amplifies that rounding in the gradients (tests/test_fused_loss.py, SAMPLING_TOL), so the
#: yardstick is the reference's own error rather than a fixed number of ulps. That error is itself
#: a random variable (a reference that happens to be exact somewhere would demand the same luck of
#: the chunks: a seed in a thousand failed so), so, as in tests/test_fused_loss.py, it is the worst
#: of N_ORDERS fp32 evaluations, all but one with their rounding perturbed.
FACTOR = 4.0


def _floor(dtype: torch.dtype) -> float:
    """Relative to max|float64|. float64: the reference IS the oracle (error 0), so only the
    reordering counts, amplified by the chain as SAMPLING_TOL's fp32 rounding is (1e3 ulps).
    Otherwise eight fp32 ulps (where the reference happens to be exact) plus one spacing of a
    16-bit dtype (a gradient rounded to it may land on the neighbouring value)."""
    if dtype == F64:
        return 1e3 * torch.finfo(F64).eps
    ulps = 8 * torch.finfo(torch.float32).eps
    return ulps + (torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 0.0)


def _no_less_accurate(got, refs, exact, name):
    """``max|got - exact| <= FACTOR max_k max|refs_k - exact| + floor * max|exact|``."""
    exact = exact.detach().double()
    err_got = (got.detach().double() - exact).abs().max().item()
    err_ref = max((r.detach().double() - exact).abs().max().item() for r in refs)
    scale = exact.abs().max().item()
    bound = FACTOR * err_ref + _floor(got.dtype) * scale
    assert err_got <= bound, f"{name}: error {err_got:.3g} vs the reference's {err_ref:.3g}"


@pytest.fixture
def chunk_pairs(monkeypatch):
    """``chunk_pairs(n)``: :func:`chunked.pairs_per_chunk` gives ``n`` for the rest of the test
    (the real budget splits a batch only when B D^2 reaches millions)."""

    def set_chunk(n: int) -> None:
        monkeypatch.setattr(chunked, "pairs_per_chunk", lambda dim, dtype, device: n)

    return set_chunk


def _stats(batch, dim, dtype=torch.float32, noncontiguous=False):
    """Column statistics of a head-like batch (``make_inputs``) and alphas kept off the
    threshold's kinks (``repair_alpha``: there a one-ulp change of ``Pr`` flips a branch of the
    derivative), as leaves of ``dtype``; ``noncontiguous``: strides (1, B)."""
    tensors, params = make_inputs(batch, 6, 7, dim, dtype=F64)
    params = repair_alpha(tensors, params)
    mu_v, s_v = R.column_stats(tensors[1])
    mu_t, s_t = R.column_stats(tensors[4], tensors[6])

    def leaf(t):
        t = t.detach().to(dtype)
        if noncontiguous and t.dim() == 2:
            t = t.t().contiguous().t()
        return t.requires_grad_()

    return [leaf(t) for t in (mu_v, s_v, mu_t, s_t, params["alpha_image"], params["alpha_text"])]


def _run(fn, stats, grads_out):
    out = fn(*stats, tau_kl=1.0, rho=0.01)  # repair_alpha's settings
    return out, torch.autograd.grad(out, stats, grads_out)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize(
    "batch, dim, chunk, noncontiguous",
    [(5, 7, 2, False), (9, 16, 4, True), (3, 1, 1, False), (4, 33, 3, False)],
    ids=lambda v: str(v),
)
def test_matches_reference(chunk_pairs, dtype, batch, dim, chunk, noncontiguous):
    """Several chunks, the last one ragged: the four outputs and the six gradients against float64,
    as accurate as the reference on the whole batch."""
    chunk_pairs(chunk)
    stats = _stats(batch, dim, dtype, noncontiguous)
    grads_out = [torch.randn(batch, dim, dtype=dtype) for _ in range(4)]
    got = _run(chunked.related_sampling_chunked, stats, grads_out)
    # float64: the whole-batch reference is the oracle; fp32: also N_ORDERS - 1 evaluations on
    # statistics moved by one ulp in random directions (another correct fp32 rounding of them)
    refs = [_run(R.related_sampling, stats, grads_out)] + [
        _run(R.related_sampling, _one_ulp_off(stats), grads_out)
        for _ in range(N_ORDERS - 1 if dtype == torch.float32 else 0)
    ]
    exact = _run(
        R.related_sampling,
        [t.detach().double().requires_grad_() for t in stats],
        [g.double() for g in grads_out],
    )
    names = ("c_v", "a_v", "c_t", "a_t", *(f"grad {n}" for n in STAT_NAMES))
    flat = [(*outs, *grads) for outs, grads in (got, exact)]
    flat_refs = [(*outs, *grads) for outs, grads in refs]
    for k, (name, g, e) in enumerate(zip(names, *flat, strict=True)):
        _no_less_accurate(g, [r[k] for r in flat_refs], e, name)


def _one_ulp_off(stats):
    """The statistics (not the alphas) moved by one ulp each, in random directions, as leaves."""
    moved = []
    for k, t in enumerate(stats):
        t = t.detach()
        if k < 4:
            ulp = torch.finfo(t.dtype).eps
            t = t * (1 + ulp * torch.randint_like(t, 0, 2).mul(2).sub(1))
        moved.append(t.requires_grad_())
    return moved


def test_one_chunk_is_the_reference_computation(chunk_pairs):
    """A batch that fits one chunk takes the reference's ops unchanged (no checkpoint): equal to
    the bit."""
    chunk_pairs(6)
    stats = _stats(6, 12)
    grads_out = [torch.randn(6, 12) for _ in range(4)]
    out, grads = _run(chunked.related_sampling_chunked, stats, grads_out)
    want_out, want_grads = _run(R.related_sampling, stats, grads_out)
    for got, want in zip((*out, *grads), (*want_out, *want_grads), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk", [1, 3])
def test_memory_is_one_chunk(chunk_pairs, chunk):
    """What bounds the memory: the forward saves no ``[D, D]`` matrix for the backward (only the
    ``[B, D]`` statistics; the chunks' checkpoints keep nothing else), and forward and backward
    (the recompute included) create no tensor larger than one chunk's ``[chunk, D, D]``. The
    reference on the whole batch saves and creates ``[B, D, D]`` ones: the probes see them."""
    batch, dim = 8, 24  # D > B: a [1, D, D] matrix outsizes the [B, D] statistics
    chunk_pairs(chunk)
    stats = _stats(batch, dim)
    grads_out = [torch.randn(batch, dim) for _ in range(4)]
    for fn, created, saved in (
        (chunked.related_sampling_chunked, chunk * dim * dim, batch * dim),
        (R.related_sampling, batch * dim * dim, batch * dim * dim),
    ):
        largest_saved = 0

        def pack(t):
            nonlocal largest_saved
            largest_saved = max(largest_saved, t.numel())
            return t

        with _LargestTensor() as probe:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fn(*stats, tau_kl=1.0, rho=0.01)
            torch.autograd.grad(out, stats, grads_out)
        assert probe.largest == created, fn.__name__
        assert largest_saved <= saved, fn.__name__
    assert largest_saved == saved  # the reference's [B, D, D]


def test_gradcheck_through_chunks(chunk_pairs):
    chunk_pairs(2)
    stats = _stats(5, 4, F64)
    assert torch.autograd.gradcheck(
        lambda *a: chunked.related_sampling_chunked(*a, tau_kl=0.7, rho=0.01), tuple(stats)
    )


def test_pairs_per_chunk_rule():
    """Chunks fill the device's budget at the measured per-pair size, and hold at least a pair."""
    cpu, gpu = torch.device("cpu"), torch.device("meta")  # meta stands for a GPU
    per_pair = chunked.PAIR_MATRICES * 512 * 512 * 4
    budget = chunked.relation_bytes(cpu)
    assert chunked.pairs_per_chunk(512, torch.float32, cpu) == budget // per_pair == 3
    assert chunked.pairs_per_chunk(512, F64, cpu) == 1
    assert chunked.pairs_per_chunk(512, torch.float32, gpu) == 56
    assert chunked.pairs_per_chunk(8192, torch.float32, gpu) == 1
    assert chunked.pairs_per_chunk(64, torch.float32, cpu) == 227


# ---------------------------------------------------------------- through the loss API


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_backend_matches_the_reference(chunk_pairs, dtype):
    """``backend="reference"`` (which chunks) against ``cdds_fast.reference.cdds_loss`` (which
    does not) on fp32 and 16-bit inputs: the five terms and all 13 gradients, each as accurate
    (against float64) as the reference's. Alphas kept off the threshold's kinks (repair_alpha)."""
    chunk_pairs(2)
    tensors, params = make_inputs(5, 6, 7, 16, dtype=dtype)
    params = repair_alpha(tensors, params)

    def run(fn, cast=None, **kw):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in tensors[:6]]
        p = {k: v.detach().to(cast or v.dtype).requires_grad_() for k, v in params.items()}
        out = fn(*leaves, tensors[6], **p, **kw)
        grads = torch.autograd.grad(sum(out.values()), [*leaves, *p.values()])
        return [*out.values(), *grads]

    got = run(cdds_loss, backend="reference")
    exact = run(R.cdds_loss, cast=F64)
    refs = [run(R.cdds_loss)]
    for _ in range(N_ORDERS - 1):  # the reference with its rounding perturbed
        out, grads = run_reference_perturbed(tensors, params)
        refs.append([*out.values(), *(grads[n] for n in LEAF_NAMES)])
    for k, (name, g, e) in enumerate(zip((*LOSS_KEYS, *LEAF_NAMES), got, exact, strict=True)):
        _no_less_accurate(g, [r[k] for r in refs], e, name)


def test_reference_backend_compiles_fullgraph_over_chunks(chunk_pairs):
    """``torch.compile(fullgraph=True)`` of a ``CDDSLoss`` step whose batch spans three chunks
    (a checkpoint each): no graph break, the eager loss and gradients."""
    from cdds_fast import CDDSLoss

    chunk_pairs(2)
    tensors, params = make_inputs(5, 4, 6, 8)
    leaves = [*tensors[:6], *params.values()]
    loss_fn = CDDSLoss(backend="reference")
    torch._dynamo.reset()

    def step(kw):
        return loss_fn(**kw)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_compiled_matches_eager(compiled, step, loss_kwargs(tensors, params), leaves)
