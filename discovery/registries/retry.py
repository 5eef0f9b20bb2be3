"""Exponential backoff with jitter, without a clock of its own (the caller sleeps).

Temporary failures retry from :attr:`Backoff.initial` doubling up to
:attr:`Backoff.maximum`; a permanent failure (something an operator must fix,
e.g. RBAC) waits :attr:`Backoff.permanent` before the next try, so that the
fix takes effect without a restart yet the API server is not hammered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.5
    maximum: float = 30.0
    permanent: float = 60.0
    #: +/- this fraction of randomness, so that many watchers do not retry in step.
    jitter: float = 0.2
    failures: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self, *, temporary: bool = True) -> float:
        """Record a failure and return how long to wait before the next try."""
        self.failures += 1
        if temporary:
            base = min(self.maximum, self.initial * 2.0 ** min(self.failures - 1, 62))
        else:
            base = float(self.permanent)
        spread = base * self.jitter
        return max(0.0, base + self._random.uniform(-spread, spread))

    def reset(self) -> None:
        """A success: the next failure starts from :attr:`initial` again."""
        self.failures = 0


__all__ = ["Backoff"]
