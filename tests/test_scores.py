"""Importance scores (methods.md section 4) on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmms_prune.scores import (
    cls_attention,
    fit_trend,
    load_trend_weights,
    merge_pixel_shuffle,
    minmax,
    pad_to_square_token_mask,
    prior_debias,
    ratio,
    ratio_combo,
    resize_prior,
    trend,
    trend_debias,
    weight_debias,
)

# --- D2Pruner prior ------------------------------------------------------------------------------------


def test_resize_prior_interpolates_linearly_with_half_pixel_centres():
    # output i samples position (i + 0.5) * 4 / 8 - 0.5 = i / 2 - 0.25, clamped to [0, 3]
    prior = torch.tensor([1.0, 3.0, 2.0, 6.0])
    expected = torch.tensor([1.0, 1.5, 2.5, 2.75, 2.25, 3.0, 5.0, 6.0])
    assert torch.allclose(resize_prior(prior, 8), expected)


def test_resize_prior_is_the_identity_at_equal_length_and_can_shrink():
    prior = torch.tensor([1.0, 3.0, 2.0, 6.0])
    assert torch.equal(resize_prior(prior, 4), prior)
    assert torch.allclose(resize_prior(prior, 2), torch.tensor([2.0, 4.0]))  # means of the halves


def test_prior_debias_divides_by_the_resized_prior_plus_eps():
    attn = torch.tensor([0.2, 0.3, 0.5, 0.55, 0.45, 0.6, 1.0, 1.2], dtype=torch.float64)
    prior = torch.tensor([1.0, 3.0, 2.0, 6.0], dtype=torch.float64)
    resized = torch.tensor([1.0, 1.5, 2.5, 2.75, 2.25, 3.0, 5.0, 6.0], dtype=torch.float64)
    assert torch.allclose(prior_debias(attn, prior), attn / (resized + 1e-7))
    assert torch.allclose(prior_debias(attn, prior), torch.full((8,), 0.2, dtype=torch.float64))
    assert torch.allclose(prior_debias(attn, torch.zeros(8, dtype=torch.float64), eps=0.5), 2 * attn)


def test_prior_debias_rejects_bad_eps_and_shapes():
    with pytest.raises(ValueError, match="eps=0"):
        prior_debias(torch.rand(4), torch.rand(4), eps=0)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        prior_debias(torch.rand(2, 2), torch.rand(4))


# --- ratio debiasing -----------------------------------------------------------------------------------


def test_minmax_maps_to_the_unit_interval_and_constants_to_zero():
    assert torch.allclose(minmax(torch.tensor([2.0, 4.0, 3.0])), torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(minmax(torch.full((5,), 0.3)), torch.zeros(5))


def test_ratio_is_mid_over_shallow_plus_eps():
    a_mid = torch.tensor([0.2, 0.4, 0.1], dtype=torch.float64)
    a_shallow = torch.tensor([0.1, 0.1, 0.4], dtype=torch.float64)
    assert torch.allclose(ratio(a_mid, a_shallow), torch.tensor([2.0, 4.0, 0.25], dtype=torch.float64))
    assert torch.allclose(ratio(a_mid, torch.zeros(3, dtype=torch.float64)), a_mid / 1e-7)


def test_ratio_combo_weighs_the_two_minmaxed_scores():
    a_mid = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    a_shallow = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    # minmax(a_mid) = [0, .5, 1]; ratio ~ [1, 2, 1.5] -> minmax = [0, 1, .5]
    assert torch.allclose(ratio_combo(a_mid, a_shallow), torch.tensor([0.0, 0.75, 0.75], dtype=torch.float64))
    assert torch.allclose(
        ratio_combo(a_mid, a_shallow, weight=0.25), torch.tensor([0.0, 0.875, 0.625], dtype=torch.float64)
    )
    assert torch.allclose(ratio_combo(a_mid, a_shallow, weight=1.0), minmax(a_mid))
    assert torch.allclose(ratio_combo(a_mid, a_shallow, weight=0.0), minmax(ratio(a_mid, a_shallow)))


def test_ratio_rejects_mismatched_lengths_and_bad_weight():
    with pytest.raises(ValueError, match=r"a_mid has shape \(3,\) but a_shallow has \(4,\)"):
        ratio(torch.rand(3), torch.rand(4))
    with pytest.raises(ValueError, match="weight=1.5"):
        ratio_combo(torch.rand(3), torch.rand(3), weight=1.5)


# --- trend removal -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu, sigma", [(2e-3, 1.5), (0.01, -0.7), (1.0, 0.0)])
def test_fit_trend_recovers_exact_exponential_data(mu, sigma):
    x = torch.arange(64, dtype=torch.float64) / 64
    fitted_mu, fitted_sigma = fit_trend(mu * torch.exp(sigma * x))
    assert fitted_mu == pytest.approx(mu, rel=1e-9)
    assert fitted_sigma == pytest.approx(sigma, abs=1e-9)


def test_fit_trend_ignores_zero_padding_attention():
    x = torch.arange(32, dtype=torch.float64) / 32
    mean_attn = 0.05 * torch.exp(2.0 * x)
    mean_attn[:6] = 0.0  # padding rows that received no attention
    assert fit_trend(mean_attn) == pytest.approx((0.05, 2.0), rel=1e-9)


def test_fit_trend_needs_two_positive_values():
    with pytest.raises(ValueError, match="1 positive finite entries"):
        fit_trend(torch.tensor([0.0, 0.0, 0.3]))


def test_trend_debias_flattens_the_trend_and_zeroes_padding():
    mu, sigma = 0.02, 1.2
    attn = 3.0 * trend(10, mu, sigma)  # content is uniform, only the trend varies
    pad = torch.zeros(10, dtype=torch.bool)
    pad[7:] = True
    scores = trend_debias(attn, mu, sigma, pad_mask=pad)
    assert torch.allclose(scores[:7], torch.full((7,), 3.0, dtype=torch.float64))
    assert torch.equal(scores[7:], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(trend_debias(attn.float(), mu, sigma), torch.full((10,), 3.0))


def test_trend_values_and_validation():
    assert torch.allclose(trend(4, 2.0, math.log(3.0) * 4), torch.tensor([2.0, 6.0, 18.0, 54.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="mu=0"):
        trend(4, 0, 1.0)
    with pytest.raises(ValueError, match="pad_mask"):
        trend_debias(torch.rand(4), 1.0, 0.0, pad_mask=torch.zeros(3, dtype=torch.bool))


def test_weight_debias_multiplies_by_the_weights_resized_like_a_prior():
    attn = torch.rand(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.tensor([1.0, 0.8, 0.5, 0.4], dtype=torch.float64)
    assert torch.allclose(weight_debias(attn[:4], weights), attn[:4] * weights)
    assert torch.allclose(weight_debias(attn, weights), attn * resize_prior(weights, 12))
    assert weight_debias(attn.float(), weights).dtype == torch.float32


def test_an_exponential_weight_vector_is_the_reciprocal_trend():
    # The authors' HiMAP/PyramidDrop/SparseVLM/TokenCarve vectors are exp(-s * i / N): A * w = mu * (A / f).
    mu, sigma = 0.004, 1.8
    attn = torch.rand(576, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = torch.exp(-sigma * torch.arange(576, dtype=torch.float64) / 576)
    assert torch.allclose(weight_debias(attn, weights) / mu, trend_debias(attn, mu, sigma))


def test_weight_debias_zeroes_padding_tokens():
    attn = torch.rand(8, dtype=torch.float64) + 0.1
    pad = torch.tensor([True, False, False, False, False, False, True, True])
    scores = weight_debias(attn, torch.ones(8, dtype=torch.float64), pad_mask=pad)
    assert torch.equal(scores[pad], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(scores[~pad], attn[~pad])
    with pytest.raises(ValueError, match="pad_mask"):
        weight_debias(attn, torch.ones(8), pad_mask=pad.float())


def test_load_trend_weights_reads_a_released_vector(tmp_path):
    values = np.exp(-0.85 * np.arange(576) / 576)
    np.save(tmp_path / "weight.npy", values)
    weights = load_trend_weights(tmp_path / "weight.npy")
    assert weights.dtype == torch.float64 and weights.shape == (576,)
    assert torch.equal(weights, torch.from_numpy(values))
    np.save(tmp_path / "half.npy", values.astype(np.float32))
    assert load_trend_weights(str(tmp_path / "half.npy")).dtype == torch.float64


@pytest.mark.parametrize(
    ("array", "shown"),
    [
        (np.arange(5), "dtype int64"),
        (np.ones((2, 3)), r"shape \(2, 3\)"),
        (np.array([1.0, np.nan, np.inf]), "2 of 3 weights are NaN or infinite"),
        (np.array([1.0, -0.5]), "smallest weight is -0.5"),
        (np.zeros(4), "every weight is 0"),
        (np.array([{"w": 1}], dtype=object), "not a NumPy .npy array"),
    ],
)
def test_load_trend_weights_rejects_bad_files_by_name(tmp_path, array, shown):
    path = tmp_path / "bad.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(ValueError, match=shown):
        load_trend_weights(path)


def test_load_trend_weights_names_a_missing_file_and_an_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npy: no trend weight file"):
        load_trend_weights(tmp_path / "nothing.npy")
    np.savez(tmp_path / "two.npz", a=np.ones(3), b=np.ones(3))
    with pytest.raises(ValueError, match="archive"):
        load_trend_weights(tmp_path / "two.npz")


# --- LLaVA pad-to-square padding tokens ----------------------------------------------------------------


def reference_pad_mask(width: int, height: int, grid_side: int) -> np.ndarray:
    """Pixel counting: paste a width x height image as expand2square does, upsample the square by grid_side
    so that every grid cell is a whole number of pixels, and call a cell padding when at most half of its
    pixels are image."""
    side = max(width, height)
    canvas = np.zeros((side, side))
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = 1.0
    fine = np.kron(canvas, np.ones((grid_side, grid_side)))  # cell (i, j) = side x side fine pixels
    cells = fine.reshape(grid_side, side, grid_side, side).mean(axis=(1, 3))
    return (cells <= 0.5).flatten()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 9))
def test_pad_mask_equals_pixel_counting(width, height, grid_side):
    mask = pad_to_square_token_mask(width, height, grid_side)
    assert mask.dtype == torch.bool and mask.shape == (grid_side * grid_side,)
    assert mask.tolist() == reference_pad_mask(width, height, grid_side).tolist()


def test_a_square_image_has_no_padding():
    for side, grid in [(336, 24), (17, 5), (1, 1)]:
        assert not pad_to_square_token_mask(side, side, grid).any()


def test_a_wide_image_pads_top_and_bottom_rows_symmetrically():
    grid = pad_to_square_token_mask(640, 480, 24).view(24, 24)  # 80 px bars = 3 rows of 640 / 24 px
    assert grid[:3].all() and grid[-3:].all() and not grid[3:-3].any()
    for width, height in [(500, 300), (1000, 562), (90, 34)]:
        grid = pad_to_square_token_mask(width, height, 24).view(24, 24)
        assert torch.equal(grid, grid.flip(0)), "bars above and below match"
        assert torch.equal(grid.all(dim=1), grid.any(dim=1)), "padding is whole rows"
        assert grid.any()
    tall = pad_to_square_token_mask(480, 640, 24).view(24, 24)
    assert torch.equal(tall, grid_t := pad_to_square_token_mask(640, 480, 24).view(24, 24).T) and grid_t[:, :3].all()


def test_an_exactly_half_padded_token_counts_as_padding():
    # 8 x 6 on an 8 px square, 4 x 4 grid: 2 px rows, image rows 1..6, so rows 0 and 3 are half padding.
    grid = pad_to_square_token_mask(8, 6, 4).view(4, 4)
    assert grid[0].all() and grid[3].all() and not grid[1:3].any()
    # 8 x 7: one padding pixel row at the bottom (offset (8 - 7) // 2 = 0) is half of row 3: padding.
    assert pad_to_square_token_mask(8, 7, 4).view(4, 4).any(dim=1).tolist() == [False, False, False, True]
    # 16 x 15: the same pixel row is a quarter of row 3's 4 px: not padding.
    assert not pad_to_square_token_mask(16, 15, 4).any()


def test_pad_mask_rejects_bad_sizes():
    with pytest.raises(ValueError, match="width=0"):
        pad_to_square_token_mask(0, 5, 24)
    with pytest.raises(ValueError, match="grid_side=2.5"):
        pad_to_square_token_mask(5, 5, 2.5)


# --- VisPruner importance ------------------------------------------------------------------------------


def attention_map() -> torch.Tensor:
    """[H=2, T=3, T=3] rows summing to 1; token 0 plays [CLS] when has_cls=True."""
    return torch.tensor(
        [
            [[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
            [[0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.4, 0.4, 0.2]],
        ]
    )


def test_cls_attention_takes_the_cls_row_over_patches_heads_averaged():
    attn = attention_map()
    assert torch.allclose(cls_attention(attn, has_cls=True), torch.tensor([0.2, 0.5]))
    assert torch.allclose(cls_attention(attn[:, 0, :], has_cls=True), torch.tensor([0.2, 0.5]))


def test_cls_attention_without_cls_is_the_mean_received_attention():
    # head 0 column means: [.8, 1.3, .9] / 3; head 1: [.8, .8, 1.4] / 3; then the head mean
    expected = torch.tensor([1.6, 2.1, 2.3]) / 6
    assert torch.allclose(cls_attention(attention_map(), has_cls=False), expected)


def test_cls_attention_rejects_a_row_without_cls_and_bad_shapes():
    with pytest.raises(ValueError, match="has_cls=False"):
        cls_attention(torch.rand(2, 5), has_cls=False)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        cls_attention(torch.rand(2, 3, 4), has_cls=True)


@pytest.mark.parametrize("side", [4, 32])
def test_merge_pixel_shuffle_sums_the_patches_internvl_merges(side):
    from transformers.models.internvl.modeling_internvl import InternVLModel

    patches = side * side
    # channel p of patch p is 1: after pixel shuffle, each token's channels say which patches it holds
    one_hot = torch.eye(patches).reshape(1, side, side, patches)  # as InternVL reshapes [1, P, C]
    shuffled = InternVLModel.pixel_shuffle(None, one_hot, scale_factor=0.5).reshape(-1, 4, patches)
    members = shuffled.sum(dim=1)  # [tokens, patches]: 1 where the patch went into the token
    assert bool((members.sum(dim=1) == 4).all())
    assert torch.equal(merge_pixel_shuffle(torch.eye(patches), side), members.T)

    scores = torch.rand(patches, dtype=torch.float64)
    assert torch.allclose(merge_pixel_shuffle(scores, side), members.double() @ scores)


def test_merge_pixel_shuffle_keeps_leading_dims_and_total_mass():
    scores = torch.rand(3, 64)
    merged = merge_pixel_shuffle(scores, 8)
    assert merged.shape == (3, 16)
    assert torch.allclose(merged.sum(dim=1), scores.sum(dim=1))
    assert merged[0, 0] == pytest.approx(float(scores[0, [0, 1, 8, 9]].sum()))


def test_merge_pixel_shuffle_rejects_bad_sizes():
    with pytest.raises(ValueError, match="side=5 is not divisible by factor=2"):
        merge_pixel_shuffle(torch.rand(25), 5)
    with pytest.raises(ValueError, match="side\\*side=16"):
        merge_pixel_shuffle(torch.rand(15), 4)
