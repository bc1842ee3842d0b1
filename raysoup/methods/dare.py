"""DARE (Yu et al. 2024, arXiv 2311.03099, "Language Models are Super Mario"): drop each
entry of a task vector with probability p and rescale the rest by 1 / (1 - p), so that the
expected task vector is unchanged. An option of task arithmetic and TIES-merging, applied to
each task vector before the method merges them:
    m_i ~ Bernoulli(1 - p) per entry,  tau~_i = m_i * tau_i / (1 - p)
Conventions picked here:
- the draw of every entry is a fixed uniform u in [0, 1), seeded by (`dare_seed`, the
  ingredient's place in the pool, the tensor's key); an entry is dropped where u < p. So
  one seed gives the same masks on every evaluator and device, and the masks are nested in
  p (an entry dropped at p is dropped at every larger p): a searched p moves smoothly.
- p = 0 leaves the task vectors as they are (bit for bit): the default, off."""

from __future__ import annotations

import hashlib
from typing import Annotated

import torch
from pydantic import Field

from ..typed import Interval, section_config


def entry_draws(shape: torch.Size, seed: int, ingredient: int, key: str) -> torch.Tensor:
    """The fixed uniform draws u in [0, 1) of one ingredient's tensor, on the CPU."""
    digest = hashlib.sha256(f"{seed}/{ingredient}/{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def drop_and_rescale(
    tau: torch.Tensor, p: float, seed: int, ingredient: int, key: str
) -> torch.Tensor:
    """tau with the entries whose draw is below p set to 0 and the rest divided by 1 - p;
    tau itself when p = 0."""
    if p == 0.0:
        return tau
    kept = entry_draws(tau.shape, seed, ingredient, key).to(tau.device) >= p
    return torch.where(kept, tau / (1.0 - p), torch.zeros_like(tau))


DareBounds = Interval(0.0, 0.99)


@section_config
class DareKnobs:
    """The DARE keys of a method's config."""

    dare: Annotated[
        float,
        Field(
            ge=0,
            lt=1,
            description=(
                "DARE drop rate p of each task vector entry, the rest scaled by 1/(1-p); 0: off (the "
                "search's start if searched)"
            ),
        ),
    ] = 0.0
    search_dare: Annotated[bool, Field(description="also search p on val")] = False
    dare_bounds: Annotated[DareBounds, Field(description="p's range when searched")] = (0.0, 0.9)
    dare_seed: Annotated[
        int, Field(ge=0, description=("seeds the drops (per ingredient and tensor)"))
    ] = 0

    def dare_knob(self) -> tuple[list[str], list[float], list[float], list[float]]:
        """(names, start, lower, upper) of p when it is searched, else empty lists."""
        if not self.search_dare:
            return [], [], [], []
        lo, hi = self.dare_bounds
        return ["dare"], [min(hi, max(lo, self.dare))], [lo], [hi]
