"""Calibrated attention priors (D2Pruner's A_bias; the trend-debiasing fit) on disk, with their metadata.

A prior file is a ``torch.save`` dict: ``{"format": 1, "means": {num_visual_tokens: Tensor[N]}, "counts":
{N: images}, "meta": {...}}``. ``meta`` holds the model name, score layer, prompt, number of images and the
tile layouts seen. The prior is model-, layer- and layout-specific (methods.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CALIBRATE_HINT = (
    "make one with `lmms-prune calibrate --model MODEL --images DIR --layer LAYER --out PATH` "
    "and pass bias_prior=PATH"
)


@dataclass
class Prior:
    means: dict[int, torch.Tensor]
    counts: dict[int, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def for_tokens(self, n: int) -> torch.Tensor:
        """The prior for an image of ``n`` visual tokens: the exact layout if calibrated, else the most-seen
        layout (the caller resizes it linearly, D2Pruner's rule)."""
        if n in self.means:
            return self.means[n]
        best = max(self.means, key=lambda k: (self.counts.get(k, 0), k))
        return self.means[best]

    def check(self, model_name: str | None, score_layer: int | None) -> None:
        """Refuse a prior calibrated for another model or layer."""
        layer = self.meta.get("score_layer")
        if score_layer is not None and layer is not None and int(layer) != int(score_layer):
            raise ValueError(
                f"bias prior was calibrated at layer {layer} but this run scores at layer {score_layer}; "
                + CALIBRATE_HINT
            )
        name = self.meta.get("model")
        if model_name and name and Path(str(name)).name != Path(str(model_name)).name:
            raise ValueError(f"bias prior was calibrated on model {name!r}, not {model_name!r}; " + CALIBRATE_HINT)


def save_prior(path: str | Path, means: dict[int, torch.Tensor], counts: dict[int, int], meta: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": 1,
        "means": {int(k): v.detach().float().cpu() for k, v in means.items()},
        "counts": {int(k): int(v) for k, v in counts.items()},
        "meta": dict(meta),
    }
    torch.save(payload, path)
    return path


def load_prior(path: str | Path) -> Prior:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bias_prior={str(path)!r}: no such file; " + CALIBRATE_HINT)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable or not a prior
        raise ValueError(f"bias_prior={str(path)!r}: not a readable prior file ({exc}); " + CALIBRATE_HINT) from exc
    if not isinstance(payload, dict) or payload.get("format") != 1 or not payload.get("means"):
        raise ValueError(f"bias_prior={str(path)!r}: not an lmms-prune prior file; " + CALIBRATE_HINT)
    return Prior(payload["means"], payload.get("counts", {}), payload.get("meta", {}))
