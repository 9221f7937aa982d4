"""Trend removal of the attention-debiasing paper: divide attention by its fitted positional trend.

Recency bias makes text-to-vision attention grow along the visual sequence; the paper fits
``f(x) = mu * exp(sigma * x)``, ``x = i / N``, to the position-wise mean of calibrated attention and uses
``A / f(i / N)`` as the importance, with attention on padding tokens set to 0 (methods.md section 4).

The authors (github.com/intcomp/attention-bias) instead ship one weight vector per pruning method and
benchmark (``playground/data/weight/<method>/<benchmark>.npy``, float64 ``[576]`` for LLaVA-1.5, ``w[0] = 1``,
decreasing) and score ``A * w``. Their HiMAP, PyramidDrop, SparseVLM and TokenCarve vectors are exactly
``exp(-s * i / 576)`` (the reciprocal of a fitted trend, so ``trend_debias`` ranks tokens identically with
``sigma = s``); their FastV vector is a smooth non-exponential curve (from 1 to 0.358, log-deviation up to
0.26 from the best exponential), reproducible only from the file: ``load_trend_weights`` + ``weight_debias``.
"""

from __future__ import annotations

import math
import os
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from lmms_prune.scores._validate import check_positional_weights, check_vector, is_int
from lmms_prune.scores.prior import resize_prior


def fit_trend(mean_attn: Tensor) -> tuple[float, float]:
    """Fit ``mu * exp(sigma * x)``, ``x = i / N``, to a position-wise mean attention ``[N]``.

    Least squares on the log scale: ``log a_i ~ log(mu) + sigma * x_i`` (closed form, float64). The log
    fit weighs every position's relative error equally, so a few attention-sink spikes do not dominate
    it as they would an absolute-error fit. Entries that are zero, negative or not finite (e.g. padding
    that received no attention) are left out of the fit; at least two must remain.

    Returns:
        ``(mu, sigma)`` as Python floats; exact data ``mu * exp(sigma * i / N)`` is recovered to rounding.
    """
    num_tokens = check_vector(mean_attn, "mean_attn")
    values = mean_attn.detach().to(device="cpu", dtype=torch.float64)
    x = torch.arange(num_tokens, dtype=torch.float64) / num_tokens
    usable = torch.isfinite(values) & (values > 0)
    if int(usable.sum()) < 2:
        raise ValueError(
            f"mean_attn has {int(usable.sum())} positive finite entries of N={num_tokens}: "
            "the trend fit needs at least 2"
        )
    x, log_values = x[usable], values[usable].log()
    x_centred = x - x.mean()
    sigma = (x_centred * (log_values - log_values.mean())).sum() / (x_centred * x_centred).sum()
    log_mu = log_values.mean() - sigma * x.mean()
    return math.exp(float(log_mu)), float(sigma)


def trend(num_tokens: int, mu: float, sigma: float, device: torch.device | str | None = None) -> Tensor:
    """The fitted trend ``f(i / N) = mu * exp(sigma * i / N)`` for ``i = 0 .. N-1``, float64 ``[N]``."""
    if not is_int(num_tokens) or num_tokens < 1:
        raise ValueError(f"num_tokens={num_tokens!r}: must be an int >= 1")
    if isinstance(mu, bool) or not (isinstance(mu, Real) and math.isfinite(mu) and mu > 0):
        raise ValueError(f"mu={mu!r}: must be a finite number > 0 (the trend's value at x=0)")
    if isinstance(sigma, bool) or not (isinstance(sigma, Real) and math.isfinite(sigma)):
        raise ValueError(f"sigma={sigma!r}: must be a finite number")
    x = torch.arange(int(num_tokens), dtype=torch.float64) / int(num_tokens)
    return (mu * torch.exp(sigma * x)).to(device)


def trend_debias(attn: Tensor, mu: float, sigma: float, pad_mask: Tensor | None = None) -> Tensor:
    """Attention-debiasing score ``A_i / f(i / N)``, with padding tokens' attention set to 0.

    Args:
        attn: ``[N]`` text-to-vision attention of one sample.
        mu, sigma: the trend from ``fit_trend`` on calibration data.
        pad_mask: optional bool ``[N]``, True where the token is padding (LLaVA pad-to-square).

    Returns:
        ``[N]`` debiased importance, in ``attn``'s dtype.
    """
    num_tokens = check_vector(attn, "attn")
    scores = attn / trend(num_tokens, mu, sigma, attn.device).to(attn.dtype)
    return _zero_padding(scores, pad_mask)


def load_trend_weights(path: str | os.PathLike) -> Tensor:
    """Read a released trend weight vector (the attention-debiasing authors' ``.npy`` files).

    The file must hold one non-empty 1-D floating array with finite, non-negative entries, at least one
    of them positive (the authors': float64 ``[576]``, from 1 down). Any length is accepted:
    ``weight_debias`` resizes it to the sample's token count.

    Returns:
        float64 ``[M]`` tensor on the CPU.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no trend weight file there; pass a .npy vector (e.g. the attention-debiasing authors' "
            "playground/data/weight/FastV/weight.npy) or use the fitted exponential (score='trend' with a prior)"
        )
    try:
        values = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: not a NumPy .npy array ({error}); save the vector with numpy.save") from error
    if not isinstance(values, np.ndarray):
        raise ValueError(f"{path}: holds an archive of several arrays; save the one weight vector with numpy.save")
    values = check_positional_weights(values, path)
    return torch.from_numpy(values)


def weight_debias(attn: Tensor, weights: Tensor, pad_mask: Tensor | None = None) -> Tensor:
    """Attention-debiasing score with a released weight vector: ``A_i * w_i``, padding tokens set to 0.

    ``weights`` ``[M]`` (``load_trend_weights``) is resized to ``N`` tokens by the priors' linear rule
    (``scores.prior.resize_prior``) when ``M != N``.

    Args:
        attn: ``[N]`` text-to-vision attention of one sample.
        weights: ``[M]`` non-negative weights along the visual sequence.
        pad_mask: optional bool ``[N]``, True where the token is padding (``pad_to_square_token_mask``).

    Returns:
        ``[N]`` debiased importance, in ``attn``'s dtype.
    """
    num_tokens = check_vector(attn, "attn")
    check_vector(weights, "weights")
    resized = resize_prior(weights.to(device=attn.device, dtype=torch.float64), num_tokens)
    return _zero_padding(attn * resized.to(attn.dtype), pad_mask)


def _zero_padding(scores: Tensor, pad_mask: Tensor | None) -> Tensor:
    """``scores`` with the entries under ``pad_mask`` (bool, True = padding) set to 0."""
    if pad_mask is None:
        return scores
    if not isinstance(pad_mask, Tensor) or pad_mask.dtype != torch.bool or pad_mask.shape != scores.shape:
        raise ValueError(
            f"pad_mask must be a bool tensor of shape {tuple(scores.shape)} (True = padding), got "
            f"{getattr(pad_mask, 'dtype', type(pad_mask).__name__)} {tuple(getattr(pad_mask, 'shape', ()))}"
        )
    return scores.masked_fill(pad_mask.to(scores.device), 0.0)
