"""Calibrated attention priors (D2Pruner's A_bias; the trend-debiasing fit) on disk, with their metadata.

A prior file is a ``torch.save`` dict: ``{"format": 1, "means": {num_visual_tokens: Tensor[N]}, "counts":
{N: images}, "meta": {...}}``. ``meta`` holds the model name, score layer, prompt, number of images, the
tile layouts seen and the prior's ``fingerprint`` (`prior_fingerprint_from_config`). The prior is model-,
layer- and layout-specific (methods.md section 4).

Whether a prior fits a model is decided by that fingerprint, never by the model's name or folder: the model
type of the VLM and of its language model, the decoder's depth and widths, the vision tower's width and the
image-token geometry (tokens per tile or grid, image and patch sizes, merge / downsample factors, feature
layer), the score layer and the calibration prompt. It reads only a transformers config (``AutoConfig``), so a
run can check a prior before any weights load. ``meta["model"]`` is information for people only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_GEOMETRY_KEYS = ("image_seq_length", "downsample_ratio", "vision_feature_select_strategy", "vision_feature_layer")
_VISION_KEYS = ("image_size", "patch_size", "spatial_merge_size", "temporal_patch_size", "hidden_size",
                "num_hidden_layers")

CALIBRATE_HINT = (
    "make one with `lmms-prune calibrate --model MODEL --images DIR --layer LAYER --out PATH` "
    "and pass bias_prior=PATH"
)


def _plain(value: Any) -> Any:
    """A config value in a JSON-comparable form (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def prior_fingerprint_from_config(config: Any, score_layer: int, prompt: str | None) -> dict[str, Any]:
    """What a calibrated prior depends on, read from a transformers VLM config alone (no weights).

    Keys: ``model_type`` (the VLM), ``text_model_type``, ``num_hidden_layers``, ``hidden_size``,
    ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads`` (the language model), ``vision``
    (the vision tower's width, depth, image and patch sizes, merge factors: keys of `_VISION_KEYS` it has),
    ``geometry`` (tokens per tile, downsample ratio, feature layer and selection: keys of `_GEOMETRY_KEYS` the
    config has), ``score_layer`` and ``prompt``. Values missing from a config are left out, so configs of
    different families compare unequal on their ``model_type`` first.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    fingerprint: dict[str, Any] = {
        "model_type": getattr(config, "model_type", None),
        "text_model_type": getattr(text, "model_type", None),
    }
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads"):
        if getattr(text, key, None) is not None:
            fingerprint[key] = _plain(getattr(text, key))
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        fingerprint["vision"] = {k: _plain(getattr(vision, k)) for k in _VISION_KEYS
                                 if getattr(vision, k, None) is not None}
    fingerprint["geometry"] = {k: _plain(getattr(config, k)) for k in _GEOMETRY_KEYS
                               if getattr(config, k, None) is not None}
    fingerprint["score_layer"] = int(score_layer)
    fingerprint["prompt"] = prompt
    return fingerprint


def _config_of(model: Any) -> Any | None:
    """A transformers config from a config, a model, or a checkpoint name / directory (``AutoConfig``);
    None when there is nothing to read (an empty name: a model built in memory)."""
    if model is None:
        return None
    if hasattr(model, "get_text_config"):
        return model
    if hasattr(getattr(model, "config", None), "get_text_config"):
        return model.config
    name = str(model).strip()
    if not name:
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except Exception as exc:  # transformers raises OSError / ValueError / KeyError for unreadable configs
        raise ValueError(f"cannot read the config of {name!r} to check the bias prior against it ({exc}); "
                         "pass the model's config instead") from exc


def fingerprint_differences(calibrated: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: calibrated -> current`` for every key (nested one level) where the two fingerprints differ."""
    out = []
    for key in sorted(set(calibrated) | set(current)):
        a, b = calibrated.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


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

    def check(self, model: Any, score_layer: int | None, prompt: str | None = None) -> None:
        """Refuse a prior calibrated for another model, layer (or prompt, when ``prompt`` is given).

        ``model``: the model's transformers config (preferred), the model, or the checkpoint name / directory
        it was loaded from (its ``AutoConfig`` is read); an empty name skips the model comparison. The
        comparison is on `prior_fingerprint_from_config`; the folder or hub name is not compared.
        """
        layer = self.meta.get("score_layer")
        if score_layer is not None and layer is not None and int(layer) != int(score_layer):
            raise ValueError(
                f"bias prior was calibrated at layer {layer} but this run scores at layer {score_layer}; "
                + CALIBRATE_HINT
            )
        config = _config_of(model)
        if config is None:
            return
        calibrated = self.meta.get("fingerprint")
        if not isinstance(calibrated, dict):
            raise ValueError(f"bias prior (calibrated on {self.meta.get('model')!r}) carries no model fingerprint "
                             "(it predates them), so it cannot be checked against this model; " + CALIBRATE_HINT)
        layer = calibrated.get("score_layer") if score_layer is None else score_layer
        current = prior_fingerprint_from_config(config, int(layer), prompt)
        if prompt is None:
            current["prompt"] = calibrated.get("prompt")
        differences = fingerprint_differences(calibrated, current)
        if differences:
            raise ValueError(f"bias prior was calibrated on another model ({self.meta.get('model')!r}); it differs "
                             f"from this one in {'; '.join(differences)} (calibrated -> this model); "
                             + CALIBRATE_HINT)


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


def _unreadable(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in words that never suggest ``weights_only=False``
    (torch's own message does: that would run whatever code the file's pickle names)."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return ("it holds Python objects other than tensors, numbers, strings, lists and dicts, and such objects "
                "are never unpickled (unpickling can run code)")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "weights_only" in first or "unpickl" in first.lower():
        first = "not a torch.save file of tensors"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def check_payload(payload: Any, path: str) -> Prior:
    """The `Prior` of a ``torch.load``-ed prior file, after checking every part of it.

    ``means`` must map each visual-token count ``N >= 1`` to a floating ``[N]`` tensor whose values are finite
    and > 0 (mean attention probabilities; `lmms_prune.scores._validate.check_positional_weights`, shared with
    ``trend_weights``); ``counts`` maps token counts to image counts; ``meta`` is a dict. Every error names the
    file, the entry and the value, and gives the command that remakes the prior.
    """
    from lmms_prune.scores._validate import check_positional_weights, is_int

    name = f"bias_prior={path!r}"
    if not isinstance(payload, dict) or payload.get("format") != 1 or "means" not in payload:
        raise ValueError(f"{name}: not an lmms-prune prior file (a dict with format=1 and means); " + CALIBRATE_HINT)
    means, counts, meta = payload["means"], payload.get("counts", {}), payload.get("meta", {})
    if not isinstance(means, dict) or not means:
        what = "empty" if isinstance(means, dict) else f"a {type(means).__name__}"
        raise ValueError(f"{name}: means is {what}; it must map each visual-token count N to a tensor [N]; "
                         + CALIBRATE_HINT)
    for n, values in means.items():
        where = f"{name}: means[{n!r}]"
        if not is_int(n) or n < 1:
            raise ValueError(f"{where}: the key must be a visual-token count (an int >= 1); " + CALIBRATE_HINT)
        if not isinstance(values, torch.Tensor):
            raise ValueError(f"{where}: a {type(values).__name__}, not a tensor [N]; " + CALIBRATE_HINT)
        try:
            check_positional_weights(values, where, noun="value", positive=True)
        except ValueError as err:
            raise ValueError(f"{err}; " + CALIBRATE_HINT) from None
        if values.numel() != n:
            raise ValueError(f"{where}: {values.numel()} values for {n} visual tokens; " + CALIBRATE_HINT)
    if not isinstance(counts, dict) or not all(is_int(v) and v >= 0 for v in counts.values()):
        raise ValueError(f"{name}: counts must map token counts to numbers of images; " + CALIBRATE_HINT)
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: meta is a {type(meta).__name__}, not a dict; " + CALIBRATE_HINT)
    return Prior({int(k): v for k, v in means.items()}, dict(counts), dict(meta))


def load_prior(path: str | Path) -> Prior:
    """Read and check a prior file (`check_payload`); only tensors and plain containers are ever read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bias_prior={str(path)!r}: no such file; " + CALIBRATE_HINT)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, truncated or not a prior: torch raises several types
        raise ValueError(f"bias_prior={str(path)!r}: not a readable prior file ({_unreadable(exc)}); "
                         + CALIBRATE_HINT) from None
    return check_payload(payload, str(path))
