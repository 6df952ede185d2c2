"""Fused related weights + distribution sampling (``cdds_fast.kernels.sampling``) vs the reference.

Every parity case draws fresh inputs from a seed that is part of the test id (so a failure
reproduces), runs the Triton op (interpreter on CPU) and ``reference.sampling.related_sampling``
(``related_weights`` + ``sampling_coefficients``, both directions) in float64 (the ground truth),
and compares the four outputs and the gradients of all six inputs under random upstream gradients
on all four outputs.

Discontinuities.  ``W`` is continuous but its derivative jumps where ``Pr_ij`` crosses the threshold
``k_i`` (relu), where ``t1 == t2`` (min) and where the max changes. A float32 computation (the
reference in float32 as much as the kernel) takes the other side of such a point when the input lies
within rounding of it; at D = 512 several rows in a hundred are within 1e-5 of one, and the float32
*reference* then differs from the float64 one by up to 20 % of max|grad|. So random inputs are
"repaired" (``_repair``) until every row keeps a relative margin of 1e-5 (more for large logits)
from all three (choosing alpha_i among random candidates in [-1, 3], nudging the source mean of
rows no alpha fixes), and the boundaries themselves are tested with exact ties (constant and
duplicated columns), where every implementation sees the same tie.

Multi-tile code paths (several column tiles, masked tails, several row blocks) are forced with
small tiles through the ``sampling_tiles`` fixture; the interpreter's tiles cover D <= 512.
"""

from __future__ import annotations

import math

import pytest
import torch

from cdds_fast.kernels import sampling as sampling_mod
from cdds_fast.kernels.sampling import related_sampling
from cdds_fast.reference import column_stats
from cdds_fast.reference.related import gaussian_kl, related_probabilities, related_weights
from cdds_fast.reference.sampling import related_sampling as reference_related_sampling

# (dtype, atol, rtol, reason). atol is relative to max|reference| of the compared tensor (each
# gradient is compared on its own scale); inputs are float32 statistics, the truth is float64.
TOLERANCES = {
    "outputs": (
        torch.float32,
        1e-5,
        1e-5,
        "c, a are W-weighted means of D fp32 values: a few ulps per term, amplified by at most "
        "max(Pr)/Z <= 1/rho in the normalisation; the fp32 reference shows up to ~3e-6",
    ),
    "grads": (
        torch.float32,
        1e-4,
        1e-4,
        "the backward chains 1/Z (Z can be as small as rho * max Pr), the softmax (1/tau) and "
        "1/(D std); the float32 *reference* deviates from float64 by up to ~6e-5 of max|grad| on "
        "these inputs (tau = 0.25), the kernel by about the same",
    ),
}
MARGIN = 1e-5
NAMES = ("mu_v", "s_v", "mu_t", "s_t", "alpha_image", "alpha_text")
OUTS = ("c_v", "a_v", "c_t", "a_t")


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stats(kind: str, b: int, d: int, g: torch.Generator) -> list[torch.Tensor]:
    """``[mu_v, s_v, mu_t, s_t]`` float32 ``[B, D]``."""
    if kind == "gauss":  # mu ~ N(0, 1), s ~ U(0.5, 2)
        return [
            torch.randn(b, d, generator=g)
            if i % 2 == 0
            else 0.5 + 1.5 * torch.rand(b, d, generator=g)
            for i in range(4)
        ]
    if kind in ("tokens", "tokens_1e4"):  # realistic: column_stats of tokens with varied columns
        out = []
        for n in (50, 77):
            col_scale = 0.2 + 1.8 * torch.rand(b, 1, d, generator=g)
            col_shift = 0.5 * torch.randn(b, 1, d, generator=g)
            x = col_shift + col_scale * torch.randn(b, n, d, generator=g)
            if kind == "tokens_1e4":
                x = 1e4 * x
            out.extend(column_stats(x))
        return out
    if kind == "offset_1e4":  # large means with unit-scale spread: d_ij = mu_i - nu_j cancels
        mu_v, s_v, mu_t, s_t = _stats("gauss", b, d, g)
        return [mu_v + 1e4, s_v, mu_t + 1e4, s_t]
    raise ValueError(kind)


def _row_margins(mu_s, s_s, mu_d, s_d, alphas, tau, rho) -> torch.Tensor:
    """float64 distance of each row ``[B, D]`` from the nearest gradient discontinuity, for each of
    ``C`` candidate alphas ``[C, D]`` -> ``[B, D, C]``, relative to the row max of Pr (times a
    factor for large logits): relu boundary ``min_j |Pr_ij - k_i|``, min branch ``|t1 - t2|`` and
    the gap between the max and the runner-up (exact ties count as no gap problem)."""
    pr = related_probabilities(mu_s.double(), s_s.double(), mu_d.double(), s_d.double(), tau_kl=tau)
    n = pr.shape[-1]
    mean = pr.mean(-1, keepdim=True)
    std = ((pr - mean) ** 2).mean(-1, keepdim=True).sqrt()
    srt = pr.sort(-1).values
    mx = srt[..., -1:]
    t1 = mean + alphas.double().t()[None] * std  # [B, D, C]
    t2 = (1 - rho) * mx
    k = torch.minimum(t1, t2)
    idx = torch.searchsorted(srt, k.contiguous())
    hi = srt.gather(-1, idx.clamp(max=n - 1))
    lo = srt.gather(-1, (idx - 1).clamp(min=0))
    margin = torch.minimum((hi - k).abs(), (k - lo).abs())
    margin = torch.minimum(margin, (t1 - t2).abs())
    if n > 1:
        gap = mx - srt[..., -2:-1]
        margin = torch.minimum(margin, torch.where(gap == 0, mx, gap))
    # fp32 logits carry an absolute rounding error ~ eps * |x|: rows far from every column (large
    # |KL| / tau) need a proportionally larger margin; entries near k lie within log(D) of the max.
    x_max = (-gaussian_kl(mu_s.double(), s_s.double(), mu_d.double(), s_d.double()) / tau).amax(-1)
    scale = 1.0 + (x_max.abs() + s_s.double().log().abs() + math.log(n)) / 10.0
    return margin / (mx * scale[..., None])


def _row_margin(mu_s, s_s, mu_d, s_d, alpha, tau, rho) -> torch.Tensor:
    return _row_margins(mu_s, s_s, mu_d, s_d, alpha[None], tau, rho)[..., 0]


def _repair(x: list[torch.Tensor], g: torch.Generator, tau: float, rho: float) -> None:
    """Move the inputs at least MARGIN away from every gradient discontinuity: per column i pick
    alpha_i among random candidates in [-1, 3] (keeping the drawn one when it is fine) so that all
    B rows keep the margin; nudge the source mean of rows no alpha can fix (t2-branch rows)."""
    mu_v, s_v, mu_t, s_t, a_i, a_t = x
    n_cand = 32
    for _ in range(20):
        clean = True
        for mu_s, s_s, mu_d, s_d, alpha in (
            (mu_v, s_v, mu_t, s_t, a_i),
            (mu_t, s_t, mu_v, s_v, a_t),
        ):
            cand = torch.cat(
                [alpha[None], -1 + 4 * torch.rand(n_cand - 1, alpha.shape[0], generator=g)]
            )
            margins = _row_margins(mu_s, s_s, mu_d, s_d, cand, tau, rho)  # [B, D, C]
            worst = margins.amin(0)  # [D, C]
            good = worst >= MARGIN
            pick = torch.where(good.any(1), good.double().argmax(1), worst.argmax(1))
            alpha.copy_(cand.gather(0, pick[None]).squeeze(0))
            bad = margins.gather(-1, pick[None, :, None].expand(margins.shape[0], -1, 1))[..., 0]
            bad = bad < MARGIN
            if bad.any():
                clean = False
                mu_s[bad] += (
                    0.05 * torch.randn(int(bad.sum()), generator=g) * (1 + mu_s[bad].abs() * 1e-3)
                )
        if clean:
            return
    raise AssertionError("could not move the inputs away from the gradient discontinuities")


def _inputs(kind: str, b: int, d: int, seed: int, tau: float, rho: float, repair: bool = True):
    g = _gen(seed)
    x = _stats(kind, b, d, g)
    x += [-1 + 4 * torch.rand(d, generator=g), -1 + 4 * torch.rand(d, generator=g)]
    if repair:
        _repair(x, g, tau, rho)
    grads_out = [torch.randn(b, d, generator=g) for _ in range(4)]
    return x, grads_out


# ----------------------------------------------------------------------------------------------
# running both
# ----------------------------------------------------------------------------------------------


def _run(fn, inputs, grads_out, device, dtype=None, prep=None, **kw):
    """Outputs and input gradients (float64 on CPU) of ``fn``."""
    leaves = [
        t.detach().to(device=device, dtype=dtype or t.dtype).clone().requires_grad_()
        for t in inputs
    ]
    args = prep(leaves) if prep is not None else leaves
    outs = fn(*args, **kw)
    loss = sum(
        (o * go.to(device=device, dtype=o.dtype)).sum()
        for o, go in zip(outs, grads_out, strict=True)
    )
    loss.backward()
    return (
        [o.detach().double().cpu() for o in outs],
        [t.grad.double().cpu() for t in leaves],
        outs,
        leaves,
    )


def _close(name: str, got: torch.Tensor, want: torch.Tensor, key: str, extra: str = "") -> None:
    _, atol, rtol, reason = TOLERANCES[key]
    scale = float(want.abs().max()) if want.numel() else 1.0
    scale = scale if scale > 0 else 1.0
    err = float((got - want).abs().max()) / scale if want.numel() else 0.0
    torch.testing.assert_close(
        got,
        want,
        atol=atol * scale,
        rtol=rtol,
        msg=lambda m: f"{name}: max err {err:.2e} x max|ref| ({reason}) {extra}\n{m}",
    )


@pytest.fixture
def sampling_tiles(monkeypatch):
    """``sampling_tiles((BLOCK_I, BLOCK_J, num_warps))``: every sampling kernel launches with
    these tiles for the rest of the test instead of the launch rule's (``sampling._tiles``)."""

    def use(tiles):
        monkeypatch.setattr(sampling_mod, "_tiles", lambda d, kernel, device: tiles)

    return use


def _check_parity(
    inputs, grads_out, device, *, tau=1.0, rho=0.01, prep=None, compare_fp32_ref=False
):
    k_out, k_grad, outs, _ = _run(
        related_sampling, inputs, grads_out, device, prep=prep, tau_kl=tau, rho=rho
    )
    for o in outs:
        assert o.dtype == torch.float32 and o.device.type == device.type
    # exact-tie cases compare with the float32 reference, which sees the very same ties
    ref_dtype = torch.float32 if compare_fp32_ref else torch.float64
    r_out, r_grad, _, _ = _run(
        reference_related_sampling, inputs, grads_out, "cpu", ref_dtype, tau_kl=tau, rho=rho
    )
    for name, got, want in zip(OUTS, k_out, r_out, strict=True):
        _close(name, got, want, "outputs")
    for name, got, want in zip(NAMES, k_grad, r_grad, strict=True):
        _close("grad " + name, got, want, "grads")


# ----------------------------------------------------------------------------------------------
# parity
# ----------------------------------------------------------------------------------------------

# (kind, B, D, tau, tiles): tiles=None takes launch.pairwise_tiles (one column tile under the
# interpreter); explicit small tiles exercise the multi-tile paths (online max rescaling, Chan
# merge of the variance, masked tails, several row blocks, the column kernel's row loop).
PARITY = [
    ("gauss", 1, 1, 1.0, None),
    ("gauss", 3, 1, 1.0, None),
    ("gauss", 4, 7, 1.0, None),
    ("gauss", 3, 37, 1.0, None),
    ("tokens", 4, 37, 1.0, None),
    ("gauss", 4, 37, 1.0, (16, 16, 2)),
    ("tokens", 3, 64, 1.0, None),
    ("gauss", 4, 64, 0.25, (16, 32, 2)),
    ("tokens", 1, 100, 1.0, (32, 16, 2)),
    ("tokens", 1, 512, 1.0, None),
    ("tokens_1e4", 3, 37, 1.0, None),
    ("offset_1e4", 3, 37, 1.0, None),
    ("gauss", 3, 37, 3.0, (16, 16, 2)),
]


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("kind,b,d,tau,tiles", PARITY, ids=lambda v: str(v))
def test_parity(kind, b, d, tau, tiles, seed, device, sampling_tiles):
    inputs, grads_out = _inputs(kind, b, d, seed + 1000 * b + d, tau, 0.01)
    if tiles is not None:
        sampling_tiles(tiles)
    _check_parity(inputs, grads_out, device, tau=tau)


@pytest.mark.slow
@pytest.mark.parametrize("kind,b,d", [("tokens", 4, 512), ("gauss", 3, 512), ("tokens", 2, 1000)])
def test_parity_large(kind, b, d, device):
    inputs, grads_out = _inputs(kind, b, d, 7 * b + d, 1.0, 0.01)
    _check_parity(inputs, grads_out, device)


def test_both_branches_and_sparsity_covered():
    """The parity inputs really exercise both sides of the min and leave many zero weights."""
    inputs, _ = _inputs("tokens", 4, 37, 4037, 1.0, 0.01)
    mu_v, s_v, mu_t, s_t, a_i, _ = (t.double() for t in inputs)
    pr = related_probabilities(mu_v, s_v, mu_t, s_t)
    mean, std = pr.mean(-1), pr.std(-1, unbiased=False)
    t1_wins = mean + a_i * std < 0.99 * pr.amax(-1)
    assert 0.1 < t1_wins.double().mean() < 0.9
    w = related_weights(mu_v, s_v, mu_t, s_t, a_i)
    assert (w == 0).double().mean() > 0.3


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded_alpha"])
def test_non_contiguous(layout, device):
    b, d = 3, 37
    inputs, grads_out = _inputs("gauss", b, d, 11, 1.0, 0.01)

    def prep(leaves):
        if layout == "transposed":  # [D, B] storage viewed as [B, D]
            return [t.t().contiguous().t() if t.dim() == 2 else t for t in leaves]
        if layout == "strided":  # every other column of a [B, 2D] buffer / [2D] buffer
            out = []
            for t in leaves:
                wide = torch.zeros(*t.shape[:-1], 2 * d, device=t.device, dtype=t.dtype)
                wide = wide.index_copy(-1, torch.arange(0, 2 * d, 2, device=t.device), t)
                out.append(wide[..., ::2])
            return out
        # alpha as a broadcast view of a [1, D] buffer's row, stats as slices of a bigger batch
        return [
            torch.cat([t, t]).narrow(0, b, b) if t.dim() == 2 else t.unsqueeze(0).expand(2, d)[1]
            for t in leaves
        ]

    _check_parity(inputs, grads_out, device, prep=prep)


# ----------------------------------------------------------------------------------------------
# extreme and tie cases (exact ties: compared with the float32 reference, which sees the same ties)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,d", [(2, 7), (1, 37)])
def test_constant_columns_uniform_ties(b, d, device):
    """s = sqrt(1e-5) and one mu everywhere: Pr is exactly uniform, every entry ties at the max."""
    g = _gen(b * 100 + d)
    s = torch.full((b, d), math.sqrt(1e-5))
    mu = torch.full((b, d), 0.3)
    inputs = [
        mu,
        s,
        mu.clone(),
        s.clone(),
        -1 + 4 * torch.rand(d, generator=g),
        -1 + 4 * torch.rand(d, generator=g),
    ]
    grads_out = [torch.randn(b, d, generator=g) for _ in range(4)]
    _check_parity(inputs, grads_out, device, compare_fp32_ref=True)
    c_v, a_v, c_t, a_t = related_sampling(*[t.to(device) for t in inputs])
    torch.testing.assert_close(c_v.cpu(), mu, rtol=1e-6, atol=0)
    torch.testing.assert_close(a_t.cpu(), s, rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha", [-1.0, 0.5, 3.0])
def test_duplicated_columns_tie_at_max(alpha, device, sampling_tiles):
    """Destination columns come in identical triples: ties at the max (the amax gradient split)
    and tied entries on both sides of the threshold; several column tiles. rho = 0.3 so that the
    (1 - rho) max threshold keeps more than the tied triple: otherwise the kept entries all have
    the same weight gradient and g_k (hence the split among ties) would be exactly 0."""
    b, d = 3, 30
    g = _gen(int(10 * alpha) + 50)
    base = _stats("gauss", b, d // 3, g)
    inputs = [t.repeat_interleave(3, dim=1) for t in base]  # rows come in equal triples too
    inputs += [torch.full((d,), alpha), torch.full((d,), alpha)]
    grads_out = [torch.randn(b, d, generator=g) for _ in range(4)]
    sampling_tiles((16, 16, 2))
    _check_parity(inputs, grads_out, device, rho=0.3, compare_fp32_ref=True)


def test_identical_source_columns(device):
    """Every source column the same distribution: all rows of Pr are equal (rows tie)."""
    b, d = 2, 23
    g = _gen(3)
    mu_v, s_v, mu_t, s_t = _stats("gauss", b, d, g)
    mu_v = mu_v[:, :1].expand(b, d).contiguous()
    s_v = s_v[:, :1].expand(b, d).contiguous()
    for alpha in (0.5, 0.3, 0.7, 1.1, -0.2, 2.0):  # one whose threshold keeps a margin
        a = torch.full((d,), alpha)
        inputs = [mu_v, s_v, mu_t, s_t, a, a.clone()]
        if (
            min(
                float(_row_margin(*inputs[:4], a, 1.0, 0.01).min()),
                float(_row_margin(mu_t, s_t, mu_v, s_v, a, 1.0, 0.01).min()),
            )
            > MARGIN
        ):
            break
    else:
        raise AssertionError("no alpha with a margin")
    grads_out = [torch.randn(b, d, generator=g) for _ in range(4)]
    _check_parity(inputs, grads_out, device)


def test_d1_weights_are_one(device):
    """D = 1: W = [[1]], so c = mu of the other modality, a = its s; alpha gets no gradient."""
    inputs, grads_out = _inputs("gauss", 4, 1, 5, 1.0, 0.01)
    _, grads, outs, _ = _run(reference_related_sampling, inputs, grads_out, device)
    mu_v, s_v, mu_t, s_t = inputs[:4]
    for got, want in zip(outs, (mu_t, s_t, mu_v, s_v), strict=True):
        torch.testing.assert_close(got.detach().cpu(), want, rtol=1e-6, atol=0)
    # W is the constant 1, but the path through the threshold is computed (as in general D) as a
    # difference of terms of size |g| / Z with Z = rho: it cancels to ~eps / rho, so the grads
    # table applies rather than exact equality
    g_cv, g_av, g_ct, g_at = grads_out
    for name, got, want in zip(
        NAMES, grads, (g_ct, g_at, g_cv, g_av, torch.zeros(1), torch.zeros(1)), strict=True
    ):
        _close("grad " + name, got, want.double(), "grads")


def test_weights_are_convex_and_hard_threshold_picks_argmax(device):
    """c, a are convex combinations of the other modality's mu, s; with alpha large the threshold
    is (1 - rho) max, which (without near-ties) keeps only the most related column."""
    b, d = 3, 37
    inputs, _ = _inputs("tokens", b, d, 9, 1.0, 0.01, repair=False)
    mu_v, s_v, mu_t, s_t, _, _ = inputs
    big = torch.full((d,), 100.0)
    c_v, a_v, c_t, a_t = (
        t.cpu()
        for t in related_sampling(
            *[t.to(device) for t in (mu_v, s_v, mu_t, s_t, big, big)], rho=1e-3
        )
    )
    pr = related_probabilities(mu_v.double(), s_v.double(), mu_t.double(), s_t.double())
    top = pr.topk(2, dim=-1)
    clear = top.values[..., 1] < 0.99 * top.values[..., 0]
    idx = top.indices[..., 0]
    assert clear.double().mean() > 0.5
    torch.testing.assert_close(c_v[clear], mu_t.gather(1, idx)[clear], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a_v[clear], s_t.gather(1, idx)[clear], rtol=1e-6, atol=1e-6)
    inputs, _ = _inputs("gauss", b, d, 10, 1.0, 0.01)
    c_v, a_v, c_t, a_t = (t.cpu() for t in related_sampling(*[t.to(device) for t in inputs]))
    mu_v, s_v, mu_t, s_t = inputs[:4]
    for c, other in ((c_v, mu_t), (a_v, s_t), (c_t, mu_v), (a_t, s_v)):
        lo, hi = other.min(1, keepdim=True).values, other.max(1, keepdim=True).values
        assert bool(((c >= lo - 1e-5) & (c <= hi + 1e-5)).all())


def test_rho_and_tau_are_used(device):
    inputs, grads_out = _inputs("gauss", 2, 37, 21, 0.5, 0.3)
    _check_parity(inputs, grads_out, device, tau=0.5, rho=0.3)


def test_dtypes_of_outputs_and_grads(device):
    """Statistics of another float dtype are computed in fp32; grads come back in each input's
    dtype (alpha in bf16 here); outputs are float32."""
    inputs, grads_out = _inputs("gauss", 2, 9, 4, 1.0, 0.01)
    leaves = [t.to(device) for t in inputs]
    leaves[1] = leaves[1].double()
    leaves[4] = leaves[4].to(torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in leaves]
    outs = related_sampling(*leaves)
    assert all(o.dtype == torch.float32 for o in outs)
    sum((o * go.to(device)).sum() for o, go in zip(outs, grads_out, strict=True)).backward()
    for t in leaves:
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape


def test_deterministic(device):
    inputs, grads_out = _inputs("tokens", 2, 37, 8, 1.0, 0.01)
    a = _run(reference_related_sampling, inputs, grads_out, device)
    b = _run(reference_related_sampling, inputs, grads_out, device)
    for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True):
        assert torch.equal(x, y)


def test_unused_outputs_get_zero_grad(device):
    inputs, grads_out = _inputs("gauss", 2, 7, 6, 1.0, 0.01)
    zero = [torch.zeros_like(grads_out[0])] * 2
    _, k_grad, _, _ = _run(lambda *a: related_sampling(*a)[:2], inputs, grads_out[:2], device)
    _, r_grad, _, _ = _run(
        reference_related_sampling, inputs, grads_out[:2] + zero, "cpu", torch.float64
    )
    for name, got, want in zip(NAMES, k_grad, r_grad, strict=True):
        _close("grad " + name, got, want, "grads")


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


def test_opcheck(device):
    inputs, _ = _inputs("gauss", 2, 5, 1, 1.0, 0.01)
    args = [t.to(device).requires_grad_(i < 6) for i, t in enumerate(inputs)]
    torch.library.opcheck(torch.ops.cdds_fast.related_sampling.default, (*args, 1.0, 0.01))
    c, a, stats = torch.ops.cdds_fast.related_sampling(*[t.detach() for t in args], 1.0, 0.01)
    bwd_args = (
        torch.randn_like(c),
        torch.randn_like(a),
        args[4].detach(),
        args[5].detach(),
        stats,
        1.0,
        0.01,
    )
    torch.library.opcheck(torch.ops.cdds_fast.related_sampling_backward.default, bwd_args)


def test_torch_compile_caller(device):
    inputs, grads_out = _inputs("gauss", 2, 7, 2, 1.0, 0.01)

    def loss_fn(*args):
        c_v, a_v, c_t, a_t = related_sampling(*args, tau_kl=1.0, rho=0.01)
        return (c_v * a_v).sum() + (c_t - a_t).square().sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    eager = [t.to(device).requires_grad_() for t in inputs]
    comp = [t.to(device).requires_grad_() for t in inputs]
    le, lc = loss_fn(*eager), compiled(*comp)
    le.backward()
    lc.backward()
    torch.testing.assert_close(lc, le)
    for x, y in zip(comp, eager, strict=True):
        torch.testing.assert_close(x.grad, y.grad)


# ----------------------------------------------------------------------------------------------
# bad input: raised before any launch, naming the argument
# ----------------------------------------------------------------------------------------------


def _good():
    b, d = 2, 5
    return dict(
        mu_v=torch.randn(b, d),
        s_v=torch.rand(b, d) + 0.5,
        mu_t=torch.randn(b, d),
        s_t=torch.rand(b, d) + 0.5,
        alpha_image=torch.rand(d),
        alpha_text=torch.rand(d),
    )


BAD = [
    ("mu_v", lambda k: k.update(mu_v=[[0.0]]), TypeError),
    ("s_v", lambda k: k.update(s_v=k["s_v"].to(torch.int32)), TypeError),
    ("mu_t", lambda k: k.update(mu_t=k["mu_t"][None]), ValueError),
    ("s_t", lambda k: k.update(s_t=k["s_t"][:, :4]), ValueError),
    ("mu_v", lambda k: [k.update({n: k[n][:0]}) for n in NAMES[:4]], ValueError),
    ("alpha_image", lambda k: k.update(alpha_image=torch.rand(4)), ValueError),
    ("alpha_text", lambda k: k.update(alpha_text=torch.arange(5)), TypeError),
    ("alpha_text", lambda k: k.update(alpha_text=k["alpha_text"].to("meta")), ValueError),
    ("tau_kl", lambda k: k.update(tau_kl=0.0), ValueError),
    ("tau_kl", lambda k: k.update(tau_kl=float("nan")), ValueError),
    ("tau_kl", lambda k: k.update(tau_kl="1"), TypeError),
    ("rho", lambda k: k.update(rho=1.0), ValueError),
    ("rho", lambda k: k.update(rho=-0.1), ValueError),
    ("rho", lambda k: k.update(rho=True), TypeError),
]


@pytest.mark.parametrize(
    "name,mutate,exc", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)]
)
def test_bad_input(name, mutate, exc, device):
    kwargs = {n: t.to(device) for n, t in _good().items()}
    mutate(kwargs)
    with pytest.raises(exc, match=name):
        related_sampling(**kwargs)
