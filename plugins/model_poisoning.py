"""Omniscient model-poisoning attacks: ALIE, IPM, Min-Max / Min-Sum and Fang et al.'s attack.

All of them see the round's benign updates (``omniscient = True``: the engine trains the benign
clients first) and craft the malicious rows from them; all are untargeted (success = benign error).
Updates are model deltas W_i - G, one row per client, so "the benign mean" mu is the FedAvg step the
benign clients alone would take; the papers state their attacks on gradients (Baruch et al., Xie et
al., Shejwalkar & Houmansadr) or on local models (Fang et al.); on deltas the rules read the same.
The coordinate-wise sigma is the population standard deviation of the benign updates (ByzFL and
Blades divide by n - 1; Min-Max/Min-Sum search the scale anyway, and the n of a round's benign
updates may be 1).

Attacks whose strength can be searched (``alie:z=auto``, ``ipm:eps=auto``) query the cell's real
server stage through ``MaliciousRound.aggregate`` (:func:`strongest`): the line search against the
actual defense that ByzFL's ``LineMaximize`` optimiser and Shejwalkar & Houmansadr's AGR-tailored
attacks run, with their objective -- the distance of the aggregate from the benign mean.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, ClassVar

import torch

import fedbench
from fedbench.components import NON_NEGATIVE, POSITIVE, ParamInfo
from fedbench.vectors import largest_passing, pairwise_sq_distances


# --------------------------------------------------------------------------------------------------
# What the attacks share
# --------------------------------------------------------------------------------------------------
def benign_of(rnd: fedbench.MaliciousRound, attack: str) -> torch.Tensor:
    """The round's benign updates ``[n - f, P]``, or an error saying why an omniscient attack cannot run."""
    benign = rnd.benign_updates
    if benign is None:
        raise fedbench.FedbenchError(f"{attack}: needs the round's benign updates (MaliciousRound.benign_updates)")
    if len(benign) == 0:
        raise fedbench.FedbenchError(
            f"{attack}: the round has no benign client to take statistics from; "
            "use more clients per round (--per-round) than malicious ones (--malicious)"
        )
    return benign


def repeated(row: torch.Tensor, f: int) -> torch.Tensor:
    """``f`` copies of one crafted update ``[P]`` as a stack ``[f, P]``."""
    return row.unsqueeze(0).expand(f, -1).clone()


#: :func:`strongest` searches log2(strength) and resolves it to a quarter octave (a factor of 1.19)
OCTAVE_TOL = 0.25


def strongest(
    rnd: fedbench.MaliciousRound,
    craft: Callable[[float], torch.Tensor],
    fallback: float,
    lo: float,
    hi: float,
    *,
    attack: str,
) -> float:
    """The attack strength that moves the cell's aggregate furthest from the benign mean.

    Damage of a strength s: ``||aggregate([craft(s); benign]) - mu||``, the server stage run as a
    black box (``rnd.aggregate``) on the malicious rows ``craft(s)`` followed by the benign updates,
    mu their mean -- ByzFL's ``LineMaximize`` objective. Against a mean the damage grows with s; a
    robust rule lets it grow until the malicious rows are filtered out (Krum picks a benign update,
    trimming removes them), after which it drops or stays flat. So the search looks for the end of
    the rising side: the largest s in [lo, hi] (bisection on log2 s,
    :func:`fedbench.vectors.largest_passing`) whose damage still exceeds that of s / 1.19. The
    result is then compared with ``fallback`` (the paper's strength) and the more damaging one kept
    (the fallback on ties), so a searched strength never does less damage than the paper's. About a
    dozen server-stage runs per round (two per bisection step, one for the fallback).
    """
    if rnd.aggregate is None:
        raise fedbench.FedbenchError(f"{attack}: a strength of auto needs the server oracle (MaliciousRound.aggregate)")
    benign = rnd.benign_updates
    mu = benign.mean(dim=0)
    seen: dict[float, float] = {}

    def damage(s: float) -> float:
        if s not in seen:
            aggregate = rnd.aggregate(torch.cat([craft(s), benign]))
            seen[s] = float(torch.linalg.vector_norm(aggregate - mu, dtype=torch.float64))
        return seen[s]

    def rising(t: float) -> bool:  # at s = 2^t; a NaN damage compares False, so it counts as not rising
        return damage(2.0**t) > damage(2.0 ** (t - OCTAVE_TOL))

    found = 2.0 ** largest_passing(rising, math.log2(lo), math.log2(hi), tol=OCTAVE_TOL)
    return found if damage(found) > damage(fallback) else fallback


@dataclass(frozen=True)
class StrengthParam(ParamInfo):
    """A strength parameter: a number, or one of a few words (``paper``, ``auto``).

    Numbers are stored in canonical form (``1.50`` and ``1.5`` are the same spec), so the spec
    grammar, ``fedbench list`` and the result store treat the parameter like any other."""

    words: tuple[str, ...] = ()

    def allowed(self) -> str:
        return f"a number {self.check.describe()}, " + " or ".join(self.words)

    def coerce(self, owner: str, raw):
        if isinstance(raw, str) and raw.strip().lower() in self.words:
            return raw.strip().lower()
        try:
            if isinstance(raw, bool):
                raise ValueError(raw)
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not self.check(value):
            raise fedbench.SpecError(f"{owner}: parameter '{self.name}' got {raw!r}; allowed: {self.allowed()}")
        return repr(value)


# --------------------------------------------------------------------------------------------------
# A Little Is Enough
# --------------------------------------------------------------------------------------------------
def paper_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max for n clients of which f malicious: s = floor(n/2 + 1) - f supporters
    needed, z = Phi^{-1}((n - s) / n).

    It places the malicious value where (n - s) / n of a normal population lies below it, so that
    s benign values are further from the mean and "support" it. Undefined when f alone is a
    majority (s <= 0)."""
    s = math.floor(n / 2 + 1) - f
    if s <= 0:
        raise fedbench.FedbenchError(
            f"alie: with f={f} malicious of n={n} clients the attackers are a majority by themselves "
            f"(s = floor(n/2 + 1) - f = {s} supporters needed), where the paper's z_max is undefined; "
            "give z explicitly (e.g. alie:z=1)"
        )
    return NormalDist().inv_cdf((n - s) / n)


@dataclass(kw_only=True)
class ALittleIsEnough(fedbench.Attack):
    """A Little Is Enough (Baruch et al. 2019): every malicious client uploads mu - z*sigma of the benign updates.

    Definition (the paper's attack on convergence): mu and sigma are the coordinate-wise mean and
    standard deviation of the round's benign updates, and all f malicious clients upload the same
    vector mu - z sigma, which stays inside the benign spread so that median- and distance-based
    rules keep it. ``z = paper`` (default) is the paper's z_max for the round's n clients and f
    malicious ones (:func:`paper_z`; n = 10, f = 5: s = 1, z = Phi^{-1}(0.9) = 1.28);
    ``z = auto`` picks z by a line search against the cell's own server stage
    (:func:`strongest`, over z in [1/16, 64]), never worse than the paper's; a number fixes it.

    Elsewhere: the band is symmetric, and ByzFL, FLPoison and Blades upload mu + z sigma; FLPoison
    and Blades compute z from (n - f - s) / (n - f) instead of (n - s) / n (0.84 rather than 1.28
    for n = 10, f = 5); ByzFL fixes z = 1.5 (the authors' code's default ``num_std``).
    """

    name: ClassVar[str] = "alie"
    omniscient: ClassVar[bool] = True
    untargeted: ClassVar[bool] = True
    z: str = fedbench.param(
        "paper", "z in mu - z*sigma: paper = z_max from n and f, auto = line search, or a number", check=NON_NEGATIVE
    )

    SEARCH: ClassVar[tuple[float, float]] = (1 / 16, 64.0)

    @classmethod
    def param_info(cls) -> tuple[ParamInfo, ...]:
        infos = super().param_info()
        return tuple(
            StrengthParam(**{f.name: getattr(i, f.name) for f in dataclasses.fields(i)}, words=("paper", "auto"))
            if i.name == "z" else i
            for i in infos
        )

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        benign = benign_of(rnd, self.name)
        f = len(rnd.client_ids)
        sigma, mu = torch.std_mean(benign, dim=0, correction=0)

        def craft(z: float) -> torch.Tensor:
            return repeated(mu - z * sigma, f)

        if self.z == "auto":
            z = strongest(rnd, craft, paper_z(f + len(benign), f), *self.SEARCH, attack=self.name)
        elif self.z == "paper":
            z = paper_z(f + len(benign), f)
        else:
            z = float(self.z)
        return craft(z)


# --------------------------------------------------------------------------------------------------
# Inner Product Manipulation
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class InnerProductManipulation(fedbench.Attack):
    """Inner product manipulation (Xie, Koyejo, Gupta 2020): every malicious client uploads -eps times the benign mean.

    Definition: with mu the mean of the round's benign updates, all f malicious clients upload
    -eps mu. Averaged with the n - f benign ones the aggregate is ((n - f) - f eps) mu / n, whose
    inner product with mu is negative once eps > (n - f) / f (eps > 1 with half the clients
    malicious): the server then steps against the benign descent direction. The paper evaluates a
    small eps (0.1, which Krum lets through) and a large one (100, against median-based rules);
    the default is the large one, the one that also turns the plain mean around. ``eps = auto`` picks
    eps by a line search against the cell's server stage (:func:`strongest`, over eps in
    [1/64, 256]), never worse than eps = 100.

    Elsewhere: FLPoison defaults to eps = 0.1, Blades to 1, ByzFL's ``FallOfEmpires`` uploads
    (1 - tau) mu with tau = 3 (eps = 2).
    """

    name: ClassVar[str] = "ipm"
    omniscient: ClassVar[bool] = True
    untargeted: ClassVar[bool] = True
    eps: float | None = fedbench.param(
        100.0, "scaling of the negated benign mean (paper: 0.1 or 100); auto = line search", check=POSITIVE
    )

    PAPER_EPS: ClassVar[float] = 100.0
    SEARCH: ClassVar[tuple[float, float]] = (1 / 64, 256.0)

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        benign = benign_of(rnd, self.name)
        f = len(rnd.client_ids)
        mu = benign.mean(dim=0)

        def craft(eps: float) -> torch.Tensor:
            return repeated(-eps * mu, f)

        if self.eps is not None:
            return craft(self.eps)
        return craft(strongest(rnd, craft, self.PAPER_EPS, *self.SEARCH, attack=self.name))


# --------------------------------------------------------------------------------------------------
# Min-Max and Min-Sum (AGR-agnostic)
# --------------------------------------------------------------------------------------------------
def perturbation_direction(kind: str, benign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, grad_p): the benign mean and Shejwalkar & Houmansadr's perturbation direction.

    ``unit``: -mu / ||mu|| (inverse unit vector; zero when mu is), ``std``: -sigma (inverse
    coordinate-wise standard deviation), ``sign``: -sign(mu) (inverse sign)."""
    sigma, mu = torch.std_mean(benign, dim=0, correction=0)
    if kind == "unit":
        norm = torch.linalg.vector_norm(mu)
        return mu, -mu / norm if norm > 0 else torch.zeros_like(mu)
    if kind == "std":
        return mu, -sigma
    return mu, -torch.sign(mu)


@dataclass(kw_only=True)
class _AgrAgnostic(fedbench.Attack):
    """Shejwalkar & Houmansadr (NDSS 2021): mu + gamma grad_p, gamma as large as a distance condition allows.

    The condition compares squared distances of the malicious update m = mu + gamma grad_p to the
    benign updates x_i with those among the benign updates; ``fits(to_benign, pairwise)`` says
    whether it holds. ||m - x_i||^2 = ||x_i - mu||^2 - 2 gamma <x_i - mu, grad_p> + gamma^2
    ||grad_p||^2 is a quadratic in gamma, so each probe of the search costs O(n), not O(nP).
    gamma: the paper's search (Algorithm 1, :func:`fedbench.vectors.largest_passing`) from gamma_init
    = 10 with tolerance tau = 1e-5, the values of the authors' code; it reaches gamma < 2 gamma_init.
    """

    omniscient: ClassVar[bool] = True
    untargeted: ClassVar[bool] = True
    perturbation: str = fedbench.param(
        "std", "grad_p: unit (-mu/||mu||), std (-sigma) or sign (-sign(mu))", choices=("unit", "std", "sign")
    )
    gamma_init: float = fedbench.param(10.0, "first gamma of the search (it reaches up to 2 gamma_init)", check=POSITIVE)
    tau: float = fedbench.param(1e-5, "tolerance of the gamma search", check=POSITIVE)

    def fits(self, to_benign: torch.Tensor, pairwise: torch.Tensor) -> bool:
        raise NotImplementedError

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        benign = benign_of(rnd, self.name)
        mu, direction = perturbation_direction(self.perturbation, benign)
        centred = (benign - mu).to(torch.float64)
        d = direction.to(torch.float64)
        a, b, c = (centred * centred).sum(dim=1), centred @ d, d @ d
        pairwise = pairwise_sq_distances(benign)
        gamma = largest_passing(
            lambda g: self.fits(a - 2 * g * b + g * g * c, pairwise), 0.0, 2 * self.gamma_init, tol=self.tau
        )
        return repeated(mu + gamma * direction, len(rnd.client_ids))


@dataclass(kw_only=True)
class MinMax(_AgrAgnostic):
    """Min-Max (Shejwalkar & Houmansadr 2021): mu + gamma grad_p, as far from the benign updates as they are apart.

    Definition (AGR-agnostic): the largest gamma with max_i ||m - x_i|| <= max_{i,j} ||x_i - x_j||
    over the benign updates x_i, m = mu + gamma grad_p uploaded by every malicious client.
    ``perturbation = std`` is the authors' released experiments' choice; FLPoison defaults to the
    unit vector; Blades bisects gamma on [0, 5] to tolerance 0.01.
    """

    name: ClassVar[str] = "minmax"

    def fits(self, to_benign, pairwise):
        return bool(to_benign.max() <= pairwise.max())


@dataclass(kw_only=True)
class MinSum(_AgrAgnostic):
    """Min-Sum (Shejwalkar & Houmansadr 2021): mu + gamma grad_p, summed squared distances within the benign ones'.

    Definition (AGR-agnostic): the largest gamma with sum_i ||m - x_i||^2 <= max_i sum_j
    ||x_i - x_j||^2 over the benign updates, as the paper states it. The authors' released code
    compares with the minimum over i instead (a stricter bound); FLPoison uses the maximum.
    """

    name: ClassVar[str] = "minsum"

    def fits(self, to_benign, pairwise):
        return bool(to_benign.sum() <= pairwise.sum(dim=1).max())


# --------------------------------------------------------------------------------------------------
# Fang et al.'s attack on trimmed mean and median
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Fang(fedbench.Attack):
    """Fang et al. 2020 attack on trimmed mean / median: values past the benign extremes, against the benign direction.

    Definition (their attack on trimmed mean, which they also use against the median), per
    coordinate j with w_max / w_min the largest / smallest benign value and s_j the direction the
    benign clients move it (the sign of the benign mean): when s_j < 0 every malicious value is
    drawn uniformly from [w_max, b w_max] (w_max > 0) or [w_max, w_max / b] (w_max <= 0); when
    s_j > 0 from [w_min / b, w_min] (w_min > 0) or [b w_min, w_min] (w_min <= 0). b = 2 as in the
    paper; the draws come from the round's attack stream, one per malicious client and coordinate.

    Fang et al. apply the rule to the local models and take s_j from the global model's change
    without attack; here it applies to the updates (model deltas) and s_j from the benign mean, as
    Shejwalkar & Houmansadr's implementation does on gradients; a coordinate where the benign mean
    is exactly 0 counts as decreasing.
    """

    name: ClassVar[str] = "fang"
    omniscient: ClassVar[bool] = True
    untargeted: ClassVar[bool] = True
    b: float = fedbench.param(
        2.0, "how far past the benign extreme the values reach (a factor; paper: 2)", check=fedbench.Range(lo=1)
    )

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        benign = benign_of(rnd, self.name)
        b = self.b
        increasing = benign.mean(dim=0) > 0
        w_max, w_min = benign.max(dim=0).values, benign.min(dim=0).values
        up_lo, up_hi = w_max, torch.where(w_max > 0, b * w_max, w_max / b)  # push a decreasing coordinate up
        down_lo, down_hi = torch.where(w_min > 0, w_min / b, b * w_min), w_min  # push an increasing one down
        lo = torch.where(increasing, down_lo, up_lo)
        hi = torch.where(increasing, down_hi, up_hi)
        g = rnd.generator
        u = torch.rand((len(rnd.client_ids), benign.shape[1]), generator=g, device=g.device, dtype=benign.dtype)
        return lo + u.to(benign.device) * (hi - lo)


@fedbench.hookimpl
def register_attacks(register):
    register(ALittleIsEnough)
    register(InnerProductManipulation)
    register(MinMax)
    register(MinSum)
    register(Fang)
