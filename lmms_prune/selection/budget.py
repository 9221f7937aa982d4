"""Keep budget: how many visual tokens survive (methods.md section 1)."""

from __future__ import annotations

import math
from numbers import Integral, Real


def budget(num_tokens: int, keep_ratio: float | None = None, keep_tokens: int | None = None) -> int:
    """Number of visual tokens to keep out of ``num_tokens``.

    Exactly one of ``keep_ratio`` and ``keep_tokens`` must be given:

    - ``keep_ratio`` in (0, 1]: ``round(keep_ratio * num_tokens)``, at least 1 (methods.md section 1:
      10% of 256 tokens keeps 26). Rounding is Python's ``round`` (half to even), applied to the product.
    - ``keep_tokens`` >= 1: ``min(keep_tokens, num_tokens)``.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, Integral) or num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens!r}: must be an int >= 1")
    if (keep_ratio is None) == (keep_tokens is None):
        raise ValueError(
            f"keep_ratio={keep_ratio!r}, keep_tokens={keep_tokens!r}: give exactly one of the two"
        )
    if keep_ratio is not None:
        if (
            isinstance(keep_ratio, bool)
            or not isinstance(keep_ratio, Real)
            or not math.isfinite(keep_ratio)
            or not 0.0 < keep_ratio <= 1.0
        ):
            raise ValueError(f"keep_ratio={keep_ratio!r}: must be in (0, 1]")
        return max(1, int(round(keep_ratio * int(num_tokens))))
    if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, Integral) or keep_tokens < 1:
        raise ValueError(f"keep_tokens={keep_tokens!r}: must be an int >= 1")
    return int(min(keep_tokens, num_tokens))
