"""Tests for mbf_analysis.linalg against dense float64 ground truth."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from mbf_analysis.linalg import (
    add_gram_,
    all_finite,
    damped_inverse,
    damped_solve,
    inverse_root,
    kron_damped_solve_eigen,
    kron_damped_solve_split,
    kron_matvec,
    symmetrize,
    woodbury_damped_solve,
)

LOGGER = "mbf_analysis.linalg"
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def eye_like(mats: Tensor) -> Tensor:
    return torch.eye(mats.shape[-1], dtype=mats.dtype)


def random_spd(shape: tuple[int, ...], s: int, cond: float, seed: int) -> Tensor:
    """Float64 ``[*shape, s, s]`` with eigenvalues log-spaced in ``[1/cond, 1]``."""
    q, _ = torch.linalg.qr(torch.randn(*shape, s, s, dtype=F64, generator=gen(seed)))
    w = torch.logspace(0, -math.log10(cond), s, dtype=F64)
    return symmetrize((q * w) @ q.mT)


def low_rank_psd(shape: tuple[int, ...], s: int, rank: int, seed: int) -> Tensor:
    """Float64 ``G Gᵀ`` with ``G [*shape, s, rank]``: singular when ``rank < s``."""
    g = torch.randn(*shape, s, rank, dtype=F64, generator=gen(seed))
    return g @ g.mT


def rel_err(x: Tensor, ref: Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def dense_inverse(mats: Tensor, damping: float) -> Tensor:
    return torch.linalg.inv(mats.double() + damping * eye_like(mats.double()))


def fallback_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# --------------------------------------------------------------------------- damped inverse


def test_symmetrize() -> None:
    m = torch.randn(3, 4, 4, dtype=F64, generator=gen(0))
    sym = symmetrize(m)
    torch.testing.assert_close(sym, sym.mT)
    torch.testing.assert_close(sym + (m - m.mT) / 2, m)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
@pytest.mark.parametrize("s", [1, 2, 7, 16])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_damped_inverse_matches_dense(
    dtype: torch.dtype, rtol: float, s: int, shape: tuple[int, ...]
) -> None:
    mats = random_spd(shape, s, cond=1e3, seed=s).to(dtype)
    out = damped_inverse(mats, 1e-3)
    assert out.shape == mats.shape and out.dtype == dtype
    assert rel_err(out, dense_inverse(mats, 1e-3)) < rtol


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("s", [1, 5, 12])
def test_damped_solve_matches_dense(dtype: torch.dtype, rtol: float, k: int | None, s: int) -> None:
    mats = random_spd((4,), s, cond=1e3, seed=s).to(dtype)
    rhs_shape = (4, s) if k is None else (4, s, k)
    rhs = torch.randn(*rhs_shape, dtype=F64, generator=gen(1)).to(dtype)
    out = damped_solve(mats, rhs, 1e-3)
    assert out.shape == rhs.shape and out.dtype == dtype
    a = mats.double() + 1e-3 * eye_like(mats.double())
    assert rel_err(out, torch.linalg.solve(a, rhs.double())) < rtol


def test_damped_inverse_symmetrizes_input() -> None:
    mats = random_spd((3,), 6, cond=10.0, seed=2)
    skew = torch.randn(3, 6, 6, dtype=F64, generator=gen(3))
    out = damped_inverse(mats + (skew - skew.mT), 0.1)
    assert rel_err(out, dense_inverse(mats, 0.1)) < 1e-12


def test_damped_inverse_per_block_damping() -> None:
    mats = random_spd((2, 3), 4, cond=100.0, seed=4)
    lam = torch.tensor([[1e-3, 1e-1, 1.0], [0.0, 2.0, 5e-2]], dtype=F64)
    ref = torch.linalg.inv(mats + lam[..., None, None] * eye_like(mats))
    assert rel_err(damped_inverse(mats, lam), ref) < 1e-11
    broadcast = torch.linalg.inv(mats + lam[0][:, None, None] * eye_like(mats))
    assert rel_err(damped_inverse(mats, lam[0]), broadcast) < 1e-11


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("rank", [1, 3])
def test_damped_inverse_rank_deficient_blocks(dtype: torch.dtype, rtol: float, rank: int) -> None:
    """The MBF case: sums of a few outer products ``g gᵀ`` plus ``λ > 0``."""
    mats = (low_rank_psd((6,), 9, rank, seed=rank) * 1e-2).to(dtype)
    assert rel_err(damped_inverse(mats, 3e-3), dense_inverse(mats, 3e-3)) < rtol


def exact_singular(lost_pivot: float) -> Tensor:
    """``L Lᵀ`` with ``L = [[1, 0, 0], [2, 1, 0], [2, 0, 0]]``, plus ``lost_pivot`` on ``[2, 2]``.

    Every entry and every step of its Cholesky factorization is exact in float64, so whether the
    factorization fails does not depend on the BLAS: with ``lost_pivot = 0`` the last pivot is
    exactly 0 (Cholesky fails); with ``lost_pivot = 2⁻⁵⁰`` (one ulp of 4) it is ``2⁻⁵⁰ > 0``, so
    Cholesky "succeeds" on what is rounding noise, and only the lost-pivot test rejects it.
    """
    factor = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [2.0, 0.0, 0.0]], dtype=F64)
    mats = factor @ factor.mT
    mats[2, 2] += lost_pivot
    return mats


@pytest.mark.parametrize(
    "lost_pivot, cholesky_succeeds",
    [(0.0, False), (2.0**-50, True)],
    ids=["cholesky-fails", "cholesky-succeeds-on-rounding-noise"],
)
def test_zero_damping_singular_block_gives_pseudo_inverse(
    lost_pivot: float, cholesky_succeeds: bool, caplog: pytest.LogCaptureFixture
) -> None:
    singular = exact_singular(lost_pivot)
    s = singular.shape[-1]
    info = torch.linalg.cholesky_ex(singular).info
    assert bool(info == 0) == cholesky_succeeds, "test premise"
    regular = random_spd((), s, cond=10.0, seed=6)
    mats = torch.stack([regular, singular])
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        out = damped_inverse(mats, 0.0)
    assert torch.isfinite(out).all()
    assert rel_err(out[0], torch.linalg.inv(regular)) < 1e-12
    pinv = torch.linalg.pinv(singular, hermitian=True, rtol=1e-10)
    assert rel_err(out[1], pinv) < 1e-9
    assert fallback_messages(caplog) == [
        f"1 of 2 blocks (s={s}) failed Cholesky in torch.float64; "
        "1 went to the float64 eigh fallback"
    ]

    rhs_in_range = singular @ torch.randn(s, dtype=F64, generator=gen(7))
    x = damped_solve(singular, rhs_in_range, 0.0)
    assert rel_err(singular @ x, rhs_in_range) < 1e-10
    assert rel_err(x, pinv @ rhs_in_range) < 1e-9


def test_zero_damping_zero_block_is_finite() -> None:
    out = damped_inverse(torch.zeros(2, 3, 3), 0.0)
    torch.testing.assert_close(out, torch.zeros(2, 3, 3))
    assert torch.isfinite(damped_inverse(torch.zeros(1, 1, 1, dtype=F64), 1e-300)).all()


def test_zero_damping_singular_float32_block_is_finite() -> None:
    """A float32 ``g gᵀ`` is singular only up to rounding; the answer must still be usable."""
    singular = low_rank_psd((4,), 5, 1, seed=8).float()
    rhs = singular @ torch.randn(4, 5, 1, generator=gen(9))
    x = damped_solve(singular, rhs, 0.0)
    assert torch.isfinite(x).all()
    assert rel_err(singular.double() @ x.double(), rhs.double()) < 1e-3


def test_ill_conditioned_float32_falls_back_to_float64(caplog: pytest.LogCaptureFixture) -> None:
    """Float32 blocks with condition number ~1e9 on which float32 Cholesky fails."""
    s, count = 8, 6
    m32 = random_spd((count,), s, cond=1e12, seed=10).float()
    m32 = symmetrize(m32)
    m64 = m32.double()
    # Smallest per-block damping that makes the float32 data positive definite in float64.
    lam = torch.linalg.eigvalsh(m64)[:, 0].neg().clamp_min(0) + 1e-9
    a64 = m64 + lam[:, None, None] * eye_like(m64)
    assert (torch.linalg.cholesky_ex(a64).info == 0).all()
    a32 = m32 + lam.float()[:, None, None] * eye_like(m32)
    assert (torch.linalg.cholesky_ex(a32).info != 0).any(), "test premise: float32 Cholesky fails"

    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        out = damped_inverse(m32, lam)
    assert out.dtype == torch.float32
    assert rel_err(out, torch.linalg.inv(a64)) < 1e-5
    assert fallback_messages(caplog) == [
        f"{count} of {count} blocks (s={s}) failed Cholesky in torch.float32; "
        "0 went to the float64 eigh fallback"
    ]


@pytest.mark.parametrize("zero_damping_block", [False, True])
def test_trusted_damped_inverse_matches_the_checked_one(
    zero_damping_block: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The KFAC fast path: the same chain, without the input checks and the symmetrization."""
    regular = random_spd((4,), 3, cond=1e3, seed=30)
    mats = torch.cat([regular, exact_singular(0.0).unsqueeze(0)])
    lam = torch.tensor([1e-3, 0.1, 2.0, 5e-2, 0.0 if zero_damping_block else 1e-2], dtype=F64)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        trusted = damped_inverse(mats, lam, trusted=True)
    checked = damped_inverse(mats, lam)
    assert rel_err(trusted, checked) < 1e-14
    ref = torch.linalg.pinv(mats + lam[:, None, None] * eye_like(mats), hermitian=True, rtol=1e-10)
    assert rel_err(trusted, ref) < 1e-9
    messages = fallback_messages(caplog)
    if zero_damping_block:  # the singular block without damping alone takes the eigh stage
        assert messages == [
            "1 of 5 blocks (s=3) failed Cholesky in torch.float64; 1 went to the float64 eigh "
            "fallback"
        ]
    else:
        assert messages == []


def test_trusted_float32_block_that_needs_float64_falls_back() -> None:
    m32 = symmetrize(random_spd((3,), 8, cond=1e12, seed=10).float())
    m64 = m32.double()
    lam = torch.linalg.eigvalsh(m64)[:, 0].neg().clamp_min(0) + 1e-9
    a32 = m32 + lam.float()[:, None, None] * eye_like(m32)
    assert (torch.linalg.cholesky_ex(a32).info != 0).any(), "test premise: float32 Cholesky fails"
    out = damped_inverse(m32, lam, trusted=True)
    assert torch.equal(out, damped_inverse(m32, lam))
    assert rel_err(out, torch.linalg.inv(m64 + lam[:, None, None] * eye_like(m64))) < 1e-5


def test_all_finite() -> None:
    x = torch.randn(5, 7, dtype=F64, generator=gen(31))
    assert all_finite(x) and all_finite([x, x[0], torch.ones(0)]) and all_finite([])
    big = torch.full((4,), 3e38)  # finite float32 entries whose sum overflows
    assert not bool(torch.isfinite(big.sum())), "test premise"
    assert all_finite(big) and all_finite([big, x])
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 3] = bad
        assert not all_finite(y)
        assert not all_finite([x, y])
    mixed = torch.tensor([float("inf"), -float("inf")])  # sums to NaN
    assert not all_finite(mixed)


@pytest.mark.parametrize("n", [1, 7, 150, 1001])
def test_add_gram_matches_addmm(n: int) -> None:
    x = torch.randn(40, n, dtype=F64, generator=gen(32)).T  # [n, 40], transposed strides
    start = low_rank_psd((), n, 3, seed=33)
    out = add_gram_(start.clone(), x, alpha=0.3)
    ref = start.clone().addmm_(x, x.T, alpha=0.3)
    assert rel_err(out, ref) < 1e-14
    twice = add_gram_(add_gram_(torch.zeros(n, n, dtype=F64), x), x[:, :7], alpha=2.0)
    assert rel_err(twice, x @ x.T + 2.0 * x[:, :7] @ x[:, :7].T) < 1e-14
    view = torch.zeros(n + 1, n + 1, dtype=F64)
    add_gram_(view[:n, :n], x)
    assert rel_err(view[:n, :n], x @ x.T) < 1e-14 and not view[n].any() and not view[:, n].any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(bad: float) -> None:
    mats = random_spd((2,), 3, cond=10.0, seed=11)
    mats[1, 0, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        damped_inverse(mats, 1e-3)
    with pytest.raises(ValueError, match="NaN/Inf"):
        damped_solve(mats, torch.ones(2, 3, dtype=F64), 1e-3)
    good = random_spd((2,), 3, cond=10.0, seed=11)
    rhs = torch.ones(2, 3, dtype=F64)
    rhs[0, 1] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        damped_solve(good, rhs, 1e-3)
    with pytest.raises(ValueError, match="NaN/Inf"):
        damped_inverse(good, bad)


def test_invalid_arguments_raise() -> None:
    mats = random_spd((2,), 3, cond=10.0, seed=12)
    with pytest.raises(ValueError, match=">= 0"):
        damped_inverse(mats, -1e-3)
    with pytest.raises(ValueError, match="shape"):
        damped_inverse(torch.ones(2, 3, 4), 1e-3)
    with pytest.raises(ValueError, match="does not match"):
        damped_solve(mats, torch.ones(3, 3, dtype=F64), 1e-3)
    with pytest.raises(TypeError, match="floating"):
        damped_inverse(torch.ones(2, 2, dtype=torch.int64), 1e-3)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 3),
    s=st.integers(1, 8),
    rank=st.integers(0, 8),
    k=st.one_of(st.none(), st.integers(1, 3)),
    log_damping=st.floats(-4, 1),
    seed=st.integers(0, 2**16),
)
def test_damped_solve_property(
    batch: int, s: int, rank: int, k: int | None, log_damping: float, seed: int
) -> None:
    mats = low_rank_psd((batch,), s, rank, seed=seed)
    rhs_shape = (batch, s) if k is None else (batch, s, k)
    rhs = torch.randn(*rhs_shape, dtype=F64, generator=gen(seed + 1))
    damping = 10.0**log_damping
    out = damped_solve(mats, rhs, damping)
    assert out.shape == rhs.shape
    a = mats + damping * eye_like(mats)
    ref = torch.linalg.solve(a, rhs)
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9 * scale)


# --------------------------------------------------------------------------- inverse roots


def eigh_root(mats: Tensor, p: int, eps: float) -> Tensor:
    w, q = torch.linalg.eigh(mats.double() + eps * eye_like(mats.double()))
    return (q * w.pow(-1.0 / p).unsqueeze(-2)) @ q.mT


@pytest.mark.parametrize("p", [2, 4, 6])
@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_inverse_root_newton_matches_eigh(
    p: int, cond: float, caplog: pytest.LogCaptureFixture
) -> None:
    mats = random_spd((2, 3), 12, cond=cond, seed=p) * 5.0
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        out = inverse_root(mats, p, eps=1e-9, method="newton")
    assert fallback_messages(caplog) == [], "Newton should converge without fallback"
    assert out.shape == mats.shape
    assert rel_err(out, eigh_root(mats, p, 1e-9)) < 1e-9


def test_inverse_root_float32_newton(caplog: pytest.LogCaptureFixture) -> None:
    mats = random_spd((4,), 20, cond=1e3, seed=13).float()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        out = inverse_root(mats, 4, eps=1e-4, method="newton")
    assert fallback_messages(caplog) == []
    assert out.dtype == torch.float32
    assert rel_err(out, eigh_root(mats, 4, 1e-4)) < 1e-4


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_inverse_root_eigh_method(dtype: torch.dtype, rtol: float) -> None:
    mats = random_spd((3,), 10, cond=1e6, seed=14).to(dtype)
    out = inverse_root(mats, 2, eps=1e-6, method="eigh")
    assert out.dtype == dtype
    assert rel_err(out, eigh_root(mats, 2, 1e-6)) < rtol


def test_inverse_root_falls_back_when_newton_stops_early(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mats = random_spd((3,), 10, cond=1e4, seed=15)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        out = inverse_root(mats, 4, eps=1e-8, method="newton", max_iter=1)
    assert len(fallback_messages(caplog)) == 1
    assert "3 of 3" in fallback_messages(caplog)[0]
    assert rel_err(out, eigh_root(mats, 4, 1e-8)) < 1e-12


def test_inverse_root_ill_conditioned_float32_falls_back() -> None:
    mats = random_spd((2,), 16, cond=1e6, seed=16).float()
    out = inverse_root(mats, 2, eps=1e-7, method="newton")
    assert rel_err(out, eigh_root(mats, 2, 1e-7)) < 1e-5


@pytest.mark.parametrize("method", ["auto", "newton", "eigh"])
def test_inverse_root_singular_without_eps_is_pseudo_root(method: str) -> None:
    mats = low_rank_psd((), 7, 3, seed=17)
    out = inverse_root(mats, 2, method=method)
    assert torch.isfinite(out).all()
    pinv = torch.linalg.pinv(mats, hermitian=True, rtol=1e-10)
    assert rel_err(out @ out, pinv) < 1e-9


@pytest.mark.parametrize("p", [2, 4, 6])
def test_inverse_root_auto_on_cpu_is_the_eigh_root(p: int) -> None:
    mats = random_spd((2, 3), 12, cond=1e6, seed=20 + p) * 5.0
    assert torch.equal(inverse_root(mats, p, eps=1e-9), inverse_root(mats, p, 1e-9, method="eigh"))
    assert rel_err(inverse_root(mats, p, eps=1e-9), eigh_root(mats, p, 1e-9)) < 1e-9


def test_inverse_root_auto_float32_decomposes_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    mats = random_spd((3,), 40, cond=1e3, seed=24).float()
    seen = []
    eigh = torch.linalg.eigh

    def spy(a: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        seen.append(a.dtype)
        return eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    out = inverse_root(mats, 4, eps=1e-4)
    assert seen == [torch.float32]
    assert out.dtype == torch.float32
    # float32 accuracy, the same as the float32 Newton root (tested above)
    assert rel_err(out, eigh_root(mats, 4, 1e-4)) < 1e-5
    assert (
        rel_err(inverse_root(mats, 4, eps=1e-4, method="newton"), eigh_root(mats, 4, 1e-4)) < 1e-4
    )


def test_inverse_root_auto_float32_resolves_the_small_eigenvalues() -> None:
    """A rank-deficient float32 statistic: ``ε`` is below float32's eigenvalue resolution."""
    g = torch.randn(200, 150, dtype=F64, generator=gen(26))
    stat = (g @ g.T / 150).float()
    ref = eigh_root(stat.double(), 4, 1e-4)
    w32, q32 = torch.linalg.eigh(stat + 1e-4 * torch.eye(200))
    plain = (q32 * w32.clamp_min(1e-4).pow(-0.25)) @ q32.T
    assert rel_err(plain, ref) > 2e-4, "test premise: float32 eigenvalues lose ε"
    assert rel_err(inverse_root(stat, 4, eps=1e-4), ref) < 1e-4
    assert rel_err(inverse_root(stat, 4, eps=1e-4, method="newton"), ref) < 1e-4


def test_inverse_root_auto_float32_redoes_failed_matrices_in_float64(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mats = random_spd((3,), 10, cond=1e2, seed=25).float()
    eigh = torch.linalg.eigh

    def nan_for_the_middle_matrix(
        a: Tensor, *args: object, **kwargs: object
    ) -> tuple[Tensor, Tensor]:
        w, q = eigh(a, *args, **kwargs)
        if a.dtype == torch.float32:
            q = q.clone()
            q[1] = float("nan")
        return w, q

    monkeypatch.setattr(torch.linalg, "eigh", nan_for_the_middle_matrix)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        out = inverse_root(mats, 2, eps=1e-4)
    assert "1 of 3" in " ".join(fallback_messages(caplog))
    assert torch.isfinite(out).all()
    assert rel_err(out, eigh_root(mats, 2, 1e-4)) < 1e-5

    def fail_in_float32(a: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fail_in_float32)
    out = inverse_root(mats, 2, eps=1e-4)
    expected = inverse_root(mats, 2, eps=1e-4, method="eigh")
    assert torch.equal(out, expected)


def test_inverse_root_invalid_arguments() -> None:
    mats = random_spd((), 3, cond=10.0, seed=18)
    for p in (0, 1.5, True):
        with pytest.raises(ValueError, match="p must be"):
            inverse_root(mats, p)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        inverse_root(mats, 2, eps=-1.0)
    with pytest.raises(ValueError, match="method"):
        inverse_root(mats, 2, method="svd")  # type: ignore[arg-type]
    mats[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        inverse_root(mats, 2)


# --------------------------------------------------------------------------- Woodbury


@pytest.mark.parametrize("m, d", [(3, 20), (20, 6), (5, 5)])
@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("scale", [1.0, 0.2])
def test_woodbury_matches_dense(m: int, d: int, k: int | None, scale: float) -> None:
    u = torch.randn(m, d, dtype=F64, generator=gen(m + d))
    rhs = (
        torch.randn(d, dtype=F64, generator=gen(1))
        if k is None
        else torch.randn(d, k, dtype=F64, generator=gen(1))
    )
    damping = 1e-2
    out = woodbury_damped_solve(u, rhs, damping, scale)
    assert out.shape == rhs.shape
    dense = scale * u.T @ u + damping * torch.eye(d, dtype=F64)
    assert rel_err(out, torch.linalg.solve(dense, rhs)) < 1e-10


def test_woodbury_batched_and_bdf_scaling() -> None:
    """``F = (1/m) GᵀG`` for per-sample gradients ``G [m, d]`` with one system per layer copy."""
    grads = torch.randn(2, 4, 30, dtype=F64, generator=gen(19))
    rhs = torch.randn(2, 30, dtype=F64, generator=gen(20))
    out = woodbury_damped_solve(grads, rhs, 1e-3, scale=1 / 4)
    fisher = grads.mT @ grads / 4
    ref = torch.linalg.solve(fisher + 1e-3 * torch.eye(30, dtype=F64), rhs)
    assert rel_err(out, ref) < 1e-9


def test_woodbury_zero_scale_is_plain_damping() -> None:
    u = torch.randn(3, 5, dtype=F64, generator=gen(21))
    rhs = torch.randn(5, dtype=F64, generator=gen(22))
    torch.testing.assert_close(woodbury_damped_solve(u, rhs, 0.5, scale=0.0), rhs / 0.5)


def test_woodbury_invalid_arguments() -> None:
    u = torch.randn(3, 5, dtype=F64, generator=gen(23))
    rhs = torch.randn(5, dtype=F64, generator=gen(24))
    for damping in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping > 0"):
            woodbury_damped_solve(u, rhs, damping)
    with pytest.raises(ValueError, match="scale"):
        woodbury_damped_solve(u, rhs, 1.0, scale=-1.0)
    with pytest.raises(ValueError, match="does not match"):
        woodbury_damped_solve(u, torch.ones(4, dtype=F64), 1.0)


# --------------------------------------------------------------------------- Kronecker


def vec(mat: Tensor) -> Tensor:
    """Column-stacking vec of ``[g, a]``."""
    return mat.mT.reshape(-1)


def unvec(vector: Tensor, g: int, a: int) -> Tensor:
    return vector.reshape(a, g).mT


def test_vec_convention() -> None:
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    torch.testing.assert_close(vec(v), torch.tensor([1.0, 4.0, 2.0, 5.0, 3.0, 6.0]))


def test_kron_matvec_matches_dense() -> None:
    a, g = 4, 3
    big_a = torch.randn(a, a, dtype=F64, generator=gen(25))
    big_g = torch.randn(g, g, dtype=F64, generator=gen(26))
    v = torch.randn(g, a, dtype=F64, generator=gen(27))
    ref = unvec(torch.kron(big_a, big_g) @ vec(v), g, a)
    torch.testing.assert_close(kron_matvec(big_a, big_g, v), ref)


@pytest.mark.parametrize("rank_a, rank_g", [(5, 3), (2, 1)])
def test_kron_damped_solve_eigen_matches_dense(rank_a: int, rank_g: int) -> None:
    a, g = 5, 3
    big_a = low_rank_psd((), a, rank_a, seed=28)
    big_g = low_rank_psd((), g, rank_g, seed=29)
    v = torch.randn(g, a, dtype=F64, generator=gen(30))
    dense = torch.kron(big_a, big_g) + 1e-2 * torch.eye(a * g, dtype=F64)
    ref = unvec(torch.linalg.solve(dense, vec(v)), g, a)
    out = kron_damped_solve_eigen(big_a, big_g, v, 1e-2)
    assert rel_err(out, ref) < 1e-10
    assert rel_err(kron_matvec(big_a, big_g, out) + 1e-2 * out, v) < 1e-10


def split_reference(big_a: Tensor, big_g: Tensor, v: Tensor, damping: float, pi: float) -> Tensor:
    a, g = big_a.shape[-1], big_g.shape[-1]
    root = math.sqrt(damping)
    dense = torch.kron(
        big_a + pi * root * torch.eye(a, dtype=F64), big_g + root / pi * torch.eye(g, dtype=F64)
    )
    return unvec(torch.linalg.solve(dense, vec(v)), g, a)


def test_kron_damped_solve_split_matches_dense() -> None:
    a, g = 6, 4
    big_a = low_rank_psd((), a, 4, seed=31) * 3.0
    big_g = low_rank_psd((), g, 2, seed=32) * 0.01
    v = torch.randn(g, a, dtype=F64, generator=gen(33))
    pi = math.sqrt((big_a.trace() / a) / (big_g.trace() / g))
    out = kron_damped_solve_split(big_a, big_g, v, 1e-3)
    assert rel_err(out, split_reference(big_a, big_g, v, 1e-3, pi)) < 1e-10


def test_kron_damped_solve_split_zero_trace_uses_unit_pi() -> None:
    big_a = low_rank_psd((), 3, 2, seed=34)
    big_g = torch.zeros(2, 2, dtype=F64)
    v = torch.randn(2, 3, dtype=F64, generator=gen(35))
    out = kron_damped_solve_split(big_a, big_g, v, 0.25)
    assert rel_err(out, split_reference(big_a, big_g, v, 0.25, 1.0)) < 1e-12


def test_kron_solves_batched() -> None:
    big_a = low_rank_psd((2,), 4, 4, seed=36)
    big_g = low_rank_psd((2,), 3, 3, seed=37)
    v = torch.randn(2, 3, 4, dtype=F64, generator=gen(38))
    eigen = kron_damped_solve_eigen(big_a, big_g, v, 0.1)
    split = kron_damped_solve_split(big_a, big_g, v, 0.1)
    for i in range(2):
        torch.testing.assert_close(eigen[i], kron_damped_solve_eigen(big_a[i], big_g[i], v[i], 0.1))
        torch.testing.assert_close(split[i], kron_damped_solve_split(big_a[i], big_g[i], v[i], 0.1))


def test_kron_invalid_arguments() -> None:
    big_a = low_rank_psd((), 3, 3, seed=39)
    big_g = low_rank_psd((), 2, 2, seed=40)
    v = torch.randn(2, 3, dtype=F64, generator=gen(41))
    for solve in (kron_damped_solve_eigen, kron_damped_solve_split):
        with pytest.raises(ValueError, match="damping > 0"):
            solve(big_a, big_g, v, 0.0)
        with pytest.raises(ValueError, match="V must have shape"):
            solve(big_a, big_g, v.mT, 0.1)
        with pytest.raises(ValueError, match="NaN/Inf"):
            solve(big_a, big_g, v * float("nan"), 0.1)


# --------------------------------------------------------------------------- devices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_cuda_matches_cpu(dtype: torch.dtype, rtol: float) -> None:
    mats = torch.cat([random_spd((3,), 6, cond=1e3, seed=42), low_rank_psd((2,), 6, 2, seed=43)])
    mats = mats.to(dtype)
    rhs = torch.randn(5, 6, dtype=dtype, generator=gen(44))
    cuda = torch.device("cuda")
    out = damped_inverse(mats.to(cuda), 1e-3)
    assert out.device.type == "cuda"
    assert rel_err(out.cpu(), dense_inverse(mats, 1e-3)) < rtol
    x = damped_solve(mats.to(cuda), rhs.to(cuda), 0.0).cpu()
    assert torch.isfinite(x).all()
    root = inverse_root(mats[:3].to(cuda), 4, eps=1e-4).cpu()
    assert rel_err(root, eigh_root(mats[:3], 4, 1e-4)) < rtol
    newton = inverse_root(mats[:3].to(cuda), 4, eps=1e-4, method="newton").cpu()
    assert torch.equal(root, newton), "method='auto' is Newton on CUDA"
    u = torch.randn(3, 10, dtype=dtype, generator=gen(45))
    w = woodbury_damped_solve(u.to(cuda), rhs[0].to(cuda).repeat(2)[:10], 1e-2).cpu()
    dense = u.double().T @ u.double() + 1e-2 * torch.eye(10, dtype=F64)
    assert rel_err(w, torch.linalg.solve(dense, rhs[0].double().repeat(2)[:10])) < rtol
