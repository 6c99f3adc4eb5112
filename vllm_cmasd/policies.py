"""The verification policies: the one list, and the knobs each verification step reads.

Everything else derives from :class:`Policy`: the config's allowed values
(``VERIFICATION_POLICIES``), the kernels' compile-time constants, and the
parameters the verifier hands the kernels (:class:`PolicyParams`, built only
from a validated config, so its defaults are the config's). No torch or
Triton here: the config is read in vLLM's front-end process.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_cmasd.config import CmasdConfig


class Policy(enum.IntEnum):
    """Acceptance policies (docs/verification.md); the value is the kernels' constant."""

    EXACT = 0
    CONFIDENCE = 1
    TOPK_TOLERANCE = 2
    RSTITCH = 3

    @property
    def config_name(self) -> str:
        """The name in ``cmasd.verification``: ``topk-tolerance`` for TOPK_TOLERANCE."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_config_name(cls, name: str) -> Policy:
        return cls[name.upper().replace("-", "_")]


VERIFICATION_POLICIES: tuple[str, ...] = tuple(policy.config_name for policy in Policy)


@dataclass(frozen=True, kw_only=True)
class PolicyParams:
    """The acceptance policy and its knobs (CmasdConfig documents their meaning).

    No defaults: build it with :meth:`from_config`, whose defaults are the config's.
    """

    policy: Policy
    leniency: float
    confidence_floor: float
    topk_beta: int
    topk_tau: float
    rstitch_entropy: float

    @classmethod
    def from_config(cls, config: CmasdConfig) -> PolicyParams:
        return cls(
            policy=Policy.from_config_name(config.verification),
            leniency=float(config.leniency),
            confidence_floor=float(config.confidence_floor),
            topk_beta=int(config.topk_beta),
            topk_tau=float(config.topk_tau),
            rstitch_entropy=float(config.rstitch_entropy),
        )
