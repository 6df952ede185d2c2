"""Random CDDS inputs shared by the tests (fresh every call: no fixed seed is needed for
correctness; the shapes and dtypes are in each test's id so failures reproduce by shape)."""

from __future__ import annotations

import torch


def make_mask(batch: int, length: int, *, keep: float = 0.6, device="cpu") -> torch.Tensor:
    """Bool ``[B, L]`` with a random number of valid leading tokens per row (>= 1), like padded text."""
    lengths = torch.randint(1, length + 1, (batch,), device=device)
    if keep >= 1.0:
        lengths = torch.full((batch,), length, device=device)
    return torch.arange(length, device=device)[None, :] < lengths[:, None]


def make_inputs(
    batch: int = 3,
    patches: int = 5,
    length: int = 4,
    dim: int = 7,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    requires_grad: bool = True,
    mask: torch.Tensor | None = None,
    scale: float = 14.3,
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Positional tensors ``(V, V^s, V^m, T, T^s, T^m, mask)`` and the keyword parameters of
    ``cdds_loss``. Components are the tokens plus noise, so the statistics look like a real head's."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).detach().requires_grad_(requires_grad)

    v = torch.randn(batch, patches, dim, device=device)
    t = torch.randn(batch, length, dim, device=device)
    tensors = (
        leaf(v),
        leaf(0.7 * v + 0.5 * torch.randn_like(v)),
        leaf(0.3 * v + 0.5 * torch.randn_like(v)),
        leaf(t),
        leaf(0.7 * t + 0.5 * torch.randn_like(t)),
        leaf(0.3 * t + 0.5 * torch.randn_like(t)),
        make_mask(batch, length, device=device) if mask is None else mask,
    )
    params = {
        "alpha_image": leaf(0.5 + 0.5 * torch.randn(dim, device=device)),
        "alpha_text": leaf(0.5 + 0.5 * torch.randn(dim, device=device)),
        "w_s_image": leaf(1.0 + 0.1 * torch.randn(dim, device=device)),
        "w_m_image": leaf(1.0 + 0.1 * torch.randn(dim, device=device)),
        "w_s_text": leaf(1.0 + 0.1 * torch.randn(dim, device=device)),
        "w_m_text": leaf(1.0 + 0.1 * torch.randn(dim, device=device)),
        "logit_scale": torch.tensor(scale, device=device, dtype=dtype if dtype == torch.float64 else torch.float32).requires_grad_(requires_grad),
    }
    return tensors, params
