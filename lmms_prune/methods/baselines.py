"""Baselines: no pruning, a fixed set (oracle experiments), a seeded random subset, evenly spaced tokens."""

from __future__ import annotations

from lmms_prune.methods.base import Param, Preset, Score, Selector, sel

PARAMS = (
    Param("keep_indices", None, "fixed: visual-token indices to keep, per sample (list of lists, or one list for "
          "every sample), counted within the visual tokens in sequence order", kind="indices", optional=True),
    Param("seed", 0, "random: seed of the random selection", kind="int", low=0),
)


class NoScore(Score):
    """No importance score (the selector needs none)."""

    name = "none"
    stages = ("none", "llm", "pre_llm")
    subsets = True


class Fixed(Selector):
    """Keep exactly ``keep_indices`` (per sample, counted over the sample's visual tokens in order; structural
    tokens such as LLaVA-NeXT's row newlines are not counted and are always kept)."""

    name = "fixed"
    params = ("keep_indices",)

    @classmethod
    def check(cls, config):
        if config.keep_indices is None:
            raise ValueError("method 'fixed' needs keep_indices=[...] (visual-token indices to keep)")

    def __call__(self, image, scores, n):
        import torch

        keep = self.config.keep_indices
        b = image.sample
        if keep and isinstance(keep[0], (list, tuple, torch.Tensor)):
            if b >= len(keep):
                raise ValueError(f"keep_indices has {len(keep)} lists but the batch has sample {b}")
            keep = keep[b]
        idx = torch.as_tensor(list(keep) if not isinstance(keep, torch.Tensor) else keep, dtype=torch.long)
        num_visual = image.sample_visual
        if idx.numel() == 0:
            raise ValueError("keep_indices is empty: keep at least one visual token")
        if int(idx.min()) < 0 or int(idx.max()) >= num_visual:
            raise ValueError(f"keep_indices out of range: values must be in [0, {num_visual - 1}] "
                             f"(this sample has {num_visual} visual tokens), got min {int(idx.min())}, "
                             f"max {int(idx.max())}")
        if idx.unique().numel() != idx.numel():
            raise ValueError("keep_indices has duplicates: each visual token can be kept once")
        idx = idx.sort().values
        lo, hi = image.offset, image.offset + image.num_tokens
        return (idx[(idx >= lo) & (idx < hi)] - lo).to(image.device)


class Random(Selector):
    """A seeded random subset: the draw depends on ``seed`` and the image's token count only, never on the
    sample's row in a batch, so a batch keeps what its samples keep one by one (``lmms-prune check-method``)."""

    name = "random"
    params = ("seed",)
    subsets = True
    stages = ("llm", "pre_llm")  # the preset's default: inside the LLM; stage=pre_llm: before it (same draw)

    def __call__(self, image, scores, n):
        return sel.random_select(image.num_tokens, n, seed=self.config.seed, device=image.device)


class Uniform(Selector):
    """Evenly spaced tokens within each grid (tile)."""

    name = "uniform"
    stages = ("llm", "pre_llm")  # the preset's default: inside the LLM; stage=pre_llm: before it (same tokens)

    def __call__(self, image, scores, n):
        return sel.uniform_select(image.span.grids, n)


SCORES = (NoScore,)
SELECTORS = (Fixed, Random, Uniform)
PRESETS = (
    Preset("none", "no pruning: the unpruned baseline through the same code path", dict(stage="none", keep_ratio=1.0)),
    Preset("fixed", "keep exactly the visual tokens given in keep_indices (oracle experiments)",
           dict(stage="llm", selector="fixed", prune_layer=2)),
    Preset("random", "seeded random subset", dict(stage="llm", selector="random", prune_layer=2)),
    Preset("uniform", "evenly spaced tokens within each grid (tile)", dict(stage="llm", selector="uniform", prune_layer=2)),
)
