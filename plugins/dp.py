"""Differential-privacy defenses with Laplace noise: LDP on each client, CDP on the server.

The FL-WBC paper (section 7.1) compares against LDP and CDP "following Naseri et al. 2020" with clip
norm C and a Laplace noise parameter, and says no more; fedbench's definition is reference section 4.
``sigma`` is the noise-to-sensitivity ratio in L2 terms: per-coordinate Laplace scale

    b = sigma * S / sqrt(2 d)        (d = number of parameters, S = L2 sensitivity)

so that E||noise||^2 = d * 2 b^2 = (sigma * S)^2, i.e. the noise norm is about sigma * S whatever the
model size. For one clipped update S = C; for a mean of clipped updates it is smaller (see ``cdp``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import fedbench
from fedbench.components import NON_NEGATIVE, POSITIVE
from fedbench.rng import laplace, laplace_keyed
from fedbench.vectors import clip_to_norm


def laplace_scale(sigma: float, sensitivity: float, num_params: int) -> float:
    """Per-coordinate Laplace scale b = sigma * sensitivity / sqrt(2 d) (reference section 4), so the
    expected squared noise norm is (sigma * sensitivity)^2."""
    return sigma * sensitivity / math.sqrt(2 * num_params)


@dataclass(kw_only=True)
class LocalDP(fedbench.ClientDefense):
    """Local DP: each benign client clips its update to norm C and adds Laplace noise before upload.

    Noise (reference section 4, following Naseri et al. 2020): i.i.d. Laplace(0, b) per coordinate with
    b = sigma * C / sqrt(2 d), d = number of parameters, so the noise norm is about sigma * C. The
    noise of all rows is one draw of the counter-based generator (:func:`fedbench.rng.laplace_keyed`,
    counter ``("ldp",)``): row i's noise depends only on its client's defense key, not on which
    other clients train in the same batch.
    """

    name: ClassVar[str] = "ldp"
    clip: float = fedbench.param(5.0, "L2 clip norm C of each client update", check=POSITIVE)
    sigma: float = fedbench.param(1.0, "noise-to-sensitivity ratio: noise norm is about sigma * C", check=NON_NEGATIVE)

    def on_update(self, updates, keys):
        clipped = clip_to_norm(updates, self.clip)
        if self.sigma == 0:
            return clipped
        if len(keys) != len(updates):
            raise ValueError(f"ldp got {len(keys)} defense keys for {len(updates)} updates")
        b = laplace_scale(self.sigma, self.clip, updates.shape[1])
        return clipped.add_(laplace_keyed(keys.to(updates.device), ("ldp",), (updates.shape[1],), b, dtype=updates.dtype))


@dataclass(kw_only=True)
class CentralDP(fedbench.Aggregator):
    """Central DP: the server clips every update to norm C, takes the weighted mean and adds Laplace noise.

    Noise (reference section 4, following Naseri et al. 2020): i.i.d. Laplace(0, b * w_max) per
    coordinate, b = sigma * C / sqrt(2 d), where w_max = max_k w_k / sum w is the largest normalised
    weight (weights = client sample counts). Changing one client's clipped update moves the weighted
    mean by at most C * w_max in L2, so that is the sensitivity; with m equal weights it is C / m and
    the noise scale is b / m.

    NaN/inf: clipping bounds norms, it does not filter. A row with a NaN entry stays NaN and a row
    with an inf entry becomes NaN (its clip factor is 0, and 0 * inf is NaN), so the mean is NaN and
    the run diverges. A finite but huge row (1e38 per coordinate) is clipped to norm C like any
    other: its norm is taken in float64 (:func:`fedbench.vectors.clip_to_norm`), where it does not
    overflow, so the aggregate stays finite.
    """

    name: ClassVar[str] = "cdp"
    clip: float = fedbench.param(5.0, "L2 clip norm C of each client update", check=POSITIVE)
    sigma: float = fedbench.param(1.0, "noise-to-sensitivity ratio: noise norm is about sigma * C * max weight", check=NON_NEGATIVE)

    def aggregate(self, updates, weights, ctx):
        w = weights.to(updates.dtype)
        w = w / w.sum()
        mean = w @ clip_to_norm(updates, self.clip)
        if self.sigma == 0:
            return mean
        scale = laplace_scale(self.sigma, self.clip * float(w.max()), updates.shape[1])
        return mean + laplace(mean.shape, scale, ctx.generator, dtype=mean.dtype).to(mean.device)


@fedbench.hookimpl
def register_defenses(register):
    register(LocalDP)


@fedbench.hookimpl
def register_aggregators(register):
    register(CentralDP)
