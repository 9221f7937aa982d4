"""MustDrop's vision stage (``mustdrop``) runs LightCompress's arithmetic (github.com/ModelTC/LightCompress @
9701d035, read in ``llmc/compression/token_reduction/mustdrop.py``: ``conditional_pooling``, ``merge_wavg``,
``spatial_merge_hook``; nothing copied): a re-creation of it written here from reading that code is compared with
:func:`lmms_prune.selection.mustdrop_merge` on the same features, and the selection is tested by its properties.

The re-creation (LightCompress's rule, LLaVA-1.5 path): the features after the [CLS] token form a square grid,
cut into non-overlapping ``3 x 3`` windows (row-major); a window's score is the sum of its tokens' pairwise
cosine similarities with the diagonal zeroed, divided by ``9 * 8``; ``r = (N - retained) // 8`` (``fix_r``;
0 falls back to the count of windows scoring ``>= threshold``); the ``topk(r)`` windows' first 8 tokens are
summed into their last one (``scatter_reduce`` sum, sizes summed alike, then divided): the window's mean; the
output is ``[CLS, merged windows in topk order, the other tokens in ascending order]``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmms_prune import selection as sel


def lightcompress_mustdrop(x: torch.Tensor, retained: int, threshold: float = 0.6, ws: int = 3) -> torch.Tensor:
    """Re-creation for one image: ``x`` [1 + N, D] with the [CLS] token first -> the merged tokens."""
    cls, feat = x[:1], x[1:]
    n, d = feat.shape
    side = int(math.sqrt(n))
    grid = feat.T.reshape(d, side // ws, ws, side // ws, ws).permute(1, 3, 0, 2, 4)  # [gh, gw, D, ws, ws]
    flat = grid.reshape(side // ws, side // ws, d, ws * ws)
    sims = F.cosine_similarity(flat.unsqueeze(-1), flat.unsqueeze(-2), dim=2) * (1 - torch.eye(ws * ws))
    score = (sims.sum(-1).sum(-1) / (ws * ws * (ws * ws - 1))).flatten()
    r = int((score >= threshold).sum())
    fix_r = (n - retained) // (ws * ws - 1)
    if fix_r != 0:
        r = fix_r
    top = score.topk(r).indices
    windows = torch.arange(n).reshape(side, side).unfold(0, ws, ws).unfold(1, ws, ws).reshape(-1, ws * ws)
    chosen = windows[top]
    rest = torch.ones(windows.shape[0], dtype=torch.bool)
    rest[top] = False
    unm = windows[rest].flatten().sort().values
    src, dst = chosen[:, :-1].flatten(), chosen[:, -1]
    group = torch.arange(r).repeat_interleave(ws * ws - 1)
    total = feat[dst].scatter_reduce(0, group[:, None].expand(-1, d), feat[src], reduce="sum")
    size = torch.ones(r, 1).scatter_reduce(0, group[:, None], torch.ones(len(src), 1), reduce="sum")
    return torch.cat([cls, total / size, feat[unm]])


@pytest.mark.parametrize(("retained", "seed"), [(192, 0), (128, 1), (64, 2), (575, 3)])
def test_mustdrop_equals_a_recreation_of_lightcompress(retained, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(8, 8, 16, generator=gen)  # a smooth 24 x 24 image: 3 x 3 blocks of similar tokens
    feat = base.repeat_interleave(3, 0).repeat_interleave(3, 1).reshape(576, 16)
    feat = feat + 0.7 * torch.randn(576, 16, generator=gen) * torch.rand(576, 1, generator=gen)
    x = torch.cat([torch.randn(1, 16, generator=gen), feat])
    expected = lightcompress_mustdrop(x, retained)
    merge = sel.mustdrop_merge(feat, [(24, 24)], retained)
    r = merge.weights.shape[0]
    ours = sel.merged_embeddings(feat, merge)  # [kept; merged]: the merged windows after the kept tokens
    assert r > 0
    torch.testing.assert_close(ours[-r:], expected[1:1 + r], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[:len(merge.index)], expected[1 + r:], atol=0, rtol=0)
    assert merge.count == expected.shape[0] - 1 == 576 - 8 * r


def test_adaptive_count_when_the_budget_merges_no_window():
    """retained > N - 8: LightCompress's fix_r is 0 and the threshold decides."""
    gen = torch.Generator().manual_seed(4)
    feat = torch.randn(576, 16, generator=gen)
    feat[:3 * 24] = feat[0]  # the first 3 rows identical: 8 windows of similarity 1
    x = torch.cat([torch.zeros(1, 16), feat])
    merge = sel.mustdrop_merge(feat, [(24, 24)], 570, threshold=0.6)
    assert merge.weights.shape[0] == 8 and lightcompress_mustdrop(x, 570).shape[0] - 1 == merge.count


@pytest.mark.parametrize("grids", [[(24, 24)], [(16, 16), (16, 16)], [(7, 11)], [(2, 2)]])
@pytest.mark.parametrize("n", [1, 20, 100])
def test_mustdrop_partitions_the_tokens_into_kept_and_whole_windows(grids, n):
    total = sum(r * c for r, c in grids)
    feat = torch.randn(total, 8, generator=torch.Generator().manual_seed(n))
    merge = sel.mustdrop_merge(feat, grids, min(n, total))
    windows = sel.window_members(grids, (3, 3))
    assert len(windows) == sum((r // 3) * (c // 3) for r, c in grids)
    r = min((total - min(n, total)) // 8, len(windows))
    if r == 0 and len(windows):  # the adaptive count
        r = int((sel.window_similarity(feat, windows) >= 0.6).sum())
    assert merge.weights.shape[0] == r
    covered = (merge.weights > 0).sum(0) + torch.isin(torch.arange(total), merge.index).long()
    assert torch.equal(covered, torch.ones(total, dtype=torch.long))  # each token kept or in one merged window
    torch.testing.assert_close(merge.weights.sum(1), torch.ones(merge.weights.shape[0]))
    for row in merge.weights:  # a merged token is a whole 3 x 3 window of adjacent tokens
        members = torch.nonzero(row).flatten()
        assert any(torch.equal(members, w.sort().values) for w in windows)
    assert merge.count == total - 8 * merge.weights.shape[0] >= min(n, total)


def test_window_similarity_is_the_mean_pairwise_cosine():
    feat = torch.randn(9, 4, generator=torch.Generator().manual_seed(5))
    cos = F.normalize(feat, dim=-1) @ F.normalize(feat, dim=-1).T
    expected = (cos.sum() - cos.diagonal().sum()) / 72
    torch.testing.assert_close(sel.window_similarity(feat, torch.arange(9)[None]), expected[None])


def test_bad_window_is_refused():
    with pytest.raises(ValueError, match="window"):
        sel.mustdrop_merge(torch.randn(9, 4), [(3, 3)], 2, window=(1, 1))
