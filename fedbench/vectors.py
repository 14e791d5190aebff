"""Geometry of a stack of client vectors ``[n, P]``: the one place for what robust rules and attacks share.

Pairwise distances and cosine similarities come from one Gram matrix (one ``[n, P] x [P, n]``
matrix product) rather than loops over clients, and norms are taken in float64 so that a huge
update (a malicious one, say) cannot overflow float32 (above about 1.8e19 a float32 norm is inf and
a clip factor ``c / norm`` would zero the row instead of scaling it).
"""

from __future__ import annotations

import torch

_INF = float("inf")


def norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row, in float64 (``[n]``)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)


def clip_to_norm(x: torch.Tensor, clip: float | torch.Tensor) -> torch.Tensor:
    """Scale each row to L2 norm <= ``clip``; rows already inside are unchanged.

    The factor is min(1, clip / ||row||), which bounds one client's contribution without touching
    small updates; an all-zero row stays zero. ``clip`` may be a scalar or one value per row."""
    factor = torch.clamp(torch.as_tensor(clip, dtype=torch.float64, device=x.device) / norms(x), max=1.0)
    return x * factor.to(x.dtype).unsqueeze(1)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool: rows without NaN or inf."""
    return torch.isfinite(x).all(dim=1)


def _gram_sq_distances(c: torch.Tensor) -> torch.Tensor:
    """||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b for the rows of ``c`` (float64), from one Gram matrix."""
    gram = c @ c.T
    gram = (gram + gram.T) / 2  # exactly symmetric, so d[i, j] == d[j, i] bit for bit
    sq = torch.diagonal(gram)
    d = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * gram).clamp_min_(0)
    d.fill_diagonal_(0)
    return d


#: Re-centre when the first centre is farther than sqrt(1e6) = 1000x the majority's spread from it:
#: the relative rounding error of distances inside the majority is then at most about 1e-10.
RECENTRE_RATIO = 1e6


def pairwise_sq_distances(x: torch.Tensor, finite: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``x`` (``[n, n]``, float64), accurate for
    close rows even when other rows are very far away.

    From the Gram matrix of the rows centred on one of them, in float64: the rounding error of an
    entry is then about 1e-16 times the squared distances of its two rows to that centre. The first
    centre is the first finite row; if that row lies far outside the majority of the rows (more than
    1000x the majority's spread away; in fedbench's engine the malicious rows come first), the
    matrix is computed again centred on the majority's medoid (the row whose ceil(g/2)-th smallest
    distance, itself included, is smallest among the g finite rows). Typically one Gram pass.

    Why not centre on the mean: one update at 1e6 per coordinate moves the mean so far that rounding
    erases the distances between the honest updates altogether.

    Rows that are not finite (``finite[i]`` False) are placed at infinity: every distance involving
    one, its own included, is +inf; the other distances are computed as if it were absent.
    """
    if finite is None:
        finite = finite_rows(x)
    clean = x if bool(finite.all()) else torch.where(finite.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def centred_on(row: int) -> torch.Tensor:
        c = clean.to(torch.float64, copy=True)
        c -= c[row].clone()
        d = _gram_sq_distances(c)
        d[~finite] = _INF
        d[:, ~finite] = _INF
        return d

    good = int(finite.sum())
    if good == 0:
        return centred_on(0)
    first = int(torch.nonzero(finite)[0])
    d = centred_on(first)
    spread = torch.sort(d, dim=1).values[:, (good - 1) // 2]
    medoid = int(torch.argmin(spread))
    if float(d[first, medoid]) > RECENTRE_RATIO * float(spread[medoid]):
        del d
        d = centred_on(medoid)
    return d


def cosine_similarities(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between all rows (``[n, n]``, float64); a zero row has similarity 0 to all."""
    n = norms(x)
    gram = x.to(torch.float64) @ x.to(torch.float64).T if x.dtype != torch.float64 else x @ x.T
    denom = torch.outer(n, n)
    return torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(gram))


def nearest(distances: torch.Tensor, k: int, *, include_self: bool) -> torch.Tensor:
    """Indices ``[n, k]`` of each row's ``k`` nearest rows by ``distances`` (``[n, n]``), nearest first.

    Ties break by the lower index (a stable sort), so the result does not depend on torch's
    partial-sort implementation. With ``include_self=False`` a row is never its own neighbour."""
    d = distances.clone()
    if not include_self:
        d.fill_diagonal_(float("inf"))
    return torch.sort(d, dim=1, stable=True).indices[:, :k]


def weighted_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted mean of the rows: ``sum_i w_i x_i / sum_i w_i``."""
    w = weights.to(x.dtype)
    return (w / w.sum()) @ x


def weighted_sum(coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_i c_i x_i`` as one matrix-vector product (no copy of the stack), where a row with
    ``c_i = 0`` does not count at all -- even a NaN or inf row a rule has rejected (0 * NaN is NaN):
    when the fast result is not finite it is recomputed over the rows with ``c_i != 0`` only."""
    c = coefficients.to(device=x.device, dtype=x.dtype)
    out = c @ x
    if not bool(torch.isfinite(out).all()):
        keep = (coefficients != 0).to(x.device)
        out = c[keep] @ x[keep]
    return out


def largest_passing(passes, lo: float, hi: float, *, tol: float) -> float:
    """The largest ``x`` in ``[lo, hi]`` for which ``passes(x)`` holds, by bisection.

    ``passes`` must hold below some threshold and fail above it (a monotone condition); ``lo`` is
    taken to pass and is never evaluated. The first probe is the middle of the interval, and the
    search stops once the next probe would lie within ``tol`` of the largest passing value found.
    With ``lo = 0`` and ``hi = 2 gamma_init`` this is exactly the gamma search of Shejwalkar &
    Houmansadr (NDSS 2021, Algorithm 1): start at gamma_init, step by halves, stop at tolerance tau.
    Returns ``lo`` when nothing in ``(lo, hi]`` passes. Each probe calls ``passes`` once, so a
    condition that runs something costly (an aggregation rule, say) is called about
    ``log2((hi - lo) / tol)`` times.
    """
    if not hi >= lo:
        raise ValueError(f"largest_passing: need lo <= hi, got lo={lo!r}, hi={hi!r}")
    if not tol > 0:
        raise ValueError(f"largest_passing: need tol > 0, got {tol!r}")
    while (hi - lo) / 2 > tol:
        mid = lo + (hi - lo) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo
