"""The part of the Qwen-VL families' vLLM integration that Qwen2-VL, Qwen2.5-VL and Qwen3-VL share (imported by
vLLM through :func:`lmms_prune.vllm.register`, via the family modules next to this one).

Two points beside the shared budget at prompt processing (:mod:`lmms_prune.vllm.base`), each a documented
vLLM extension point (subclasses, no patch):

* **Selection on the vision tower's outputs.** :meth:`PrunedQwenVL.embed_multimodal` runs vLLM's tower while
  observing it read-only (the last full-attention block's attention kernel for ``q``/``k``, the merger for its
  input) and hands the method's own score and selector plug-ins (lmms_prune.methods, the same objects our
  transformers engine calls) the signals our family adapters build: mean received attention per merged token,
  the merger's input features, the projected embeddings, the image's grid.
* **Positions.** :meth:`lmms_prune.vllm.base.PrunedModel.get_mrope_input_positions`, which vLLM calls in the
  worker when it adds a request. ``positions="contiguous"``: the pruned prompt is numbered ``0..T'-1``.
  ``positions="original"``: vLLM's own M-RoPE positions of the unpruned prompt
  (:meth:`PrunedQwenVL.unpruned_positions`), gathered at the kept tokens; the selection runs there, on each
  image's pixels, and the encoder call reuses it.

The families differ only in where the tower's signals live, each a class attribute or a one-line method of
the family's subclass: Qwen2.5-VL permutes merge units into attention windows (:func:`merged_order`), Qwen3-VL
appends its DeepStack features to the embeddings' channels (:meth:`PrunedQwenVL.main_embeddings`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lmms_prune.engine.attention import received_attention
from lmms_prune.methods.base import Needs
from lmms_prune.scores import merge_consecutive
from lmms_prune.vllm.base import PrunedModel, pixel_input, unwrap_forward, wrap_forward


def feature_block(visual: Any) -> int:
    """The vision block whose attention VisPruner reads (methods.md section 4): Qwen2.5-VL's last full-attention
    block (its windowed blocks do not qualify); towers without windows (Qwen2-VL, Qwen3-VL): the last block, whose
    output the merger projects. As ``Qwen25VL.vision_feature_attention`` in lmms_prune.families."""
    full = getattr(visual, "fullatt_block_indexes", None)
    return full[-1] if full else len(visual.blocks) - 1


@contextmanager
def _capture(visual: Any, needs: Needs) -> Iterator[dict[str, Any]]:
    """Observe vLLM's Qwen-VL tower: ``q``/``k`` ``[1, S, H, d]`` and ``cu_seqlens`` at :func:`feature_block`'s
    attention kernel (``Needs.vision_attention``), and the merger's input ``[S, 1, C]``
    (``Needs.vision_features``, through :func:`lmms_prune.vllm.base.wrap_forward`). Read-only, undone on exit."""
    out: dict[str, Any] = {}
    hooks = []
    if needs.vision_attention:
        kernel = visual.blocks[feature_block(visual)].attn.attn

        def grab_qk(module, args, kwargs):
            out["qk"] = (kwargs["query"].detach(), kwargs["key"].detach(), kwargs["cu_seqlens"].tolist(),
                         module.scale)

        hooks.append(kernel.register_forward_pre_hook(grab_qk, with_kwargs=True))
    if needs.vision_features:
        wrap_forward(visual.merger, out, "pre")
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
        unwrap_forward(visual.merger)


def merged_order(grid_thw: torch.Tensor, vision_config: Any) -> torch.Tensor | None:
    """Prompt-order position of each merged unit in the tower's order, or None where the tower keeps the
    processor's order: Qwen2.5-VL permutes its merge units into attention windows (``window_size``) and restores
    the order after the merger; Qwen2-VL and Qwen3-VL have no windows. As ``Qwen25VL._merged_order``."""
    if getattr(vision_config, "window_size", None) is None:
        return None
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=vision_config.spatial_merge_size,
                                              window_size=vision_config.window_size,
                                              patch_size=vision_config.patch_size)
    return torch.argsort(window_index)


def vision_signals(captured: dict[str, Any], grid_thw: torch.Tensor, vision_config: Any
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``[tokens]`` mean received attention per merged token and ``[tokens, unit * C]`` merger inputs, both in
    prompt order over all images of the call (as the transformers family adapter computes them:
    ``Qwen25VL.vision_importance`` and ``flatten_pre_projector``)."""
    unit = int(vision_config.spatial_merge_size) ** 2
    order = merged_order(grid_thw.cpu(), vision_config)
    importance = features = None
    if "qk" in captured:
        q, k, cu, scale = captured["qk"]
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [1, H, S, d]
        rows = [received_attention(q[:, :, lo:hi], k[:, :, lo:hi], scale)[0] for lo, hi in zip(cu[:-1], cu[1:])]
        importance = merge_consecutive(torch.cat(rows), unit)
        importance = importance if order is None else importance[order.to(q.device)]
    if "pre" in captured:
        pre = captured["pre"]
        features = pre.reshape(-1, unit * pre.shape[-1])
        features = features if order is None else features[order.to(pre.device)]
    return importance, features


class PrunedQwenVL(PrunedModel):
    """Mixed in before vLLM's Qwen-VL model class; with ``hf_overrides['lmms_prune']`` it keeps only the method's
    tokens of each image. Without the key every method defers to vLLM's own."""

    # the key vLLM's ``_parse_and_validate_multimodal_inputs`` files images under ("image"; Qwen2-VL: "images")
    image_key = "image"
    video_keys = ("video", "videos")
    one_d_rope = False

    def check_served(self, vllm_config: Any) -> None:
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and mm_config.is_multimodal_pruning_enabled():
            # vLLM's EVS would expect position channels on every image embedding, which a pruned image lacks
            raise ValueError(f"lmms_prune: video_pruning_rate={mm_config.video_pruning_rate} (vLLM's own video "
                             "pruning) and hf_overrides['lmms_prune'] cannot be combined; serve one of them")

    def check_built(self) -> None:
        if self.use_data_parallel:
            raise ValueError("lmms_prune: mm_encoder_tp_mode='data' shards the vision tower across ranks; serve "
                             "pruned models with the default mm_encoder_tp_mode")

    def main_embeddings(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` the merger's output of one image (the embeddings our engine hands the scores), from what
        ``_process_image_input`` returns for it (Qwen3-VL appends its DeepStack features as more channels)."""
        return embeds

    # ------------------------------------------------------------------ selection
    def select_images(self, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """vLLM's tower on the call's images, observed for the method's signals: per image, the rows that replace
        its embeddings and its record line. Videos and precomputed embeddings are refused."""
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if any(key in inputs for key in self.video_keys):
            raise ValueError("lmms_prune: videos are not pruned by the vLLM plug-in yet")
        image = pixel_input(inputs.get(self.image_key))
        if image is None:
            return [], []
        needs = self.stage_needs
        with torch.no_grad(), _capture(self.visual, needs) as captured:
            embeds = self._process_image_input(image)
        missing = [name for name, need, key in (("vision attention", needs.vision_attention, "qk"),
                                                 ("merger input", needs.vision_features, "pre"))
                   if need and key not in captured]
        if missing:
            raise RuntimeError(f"lmms_prune: the vision tower ran without the hooks seeing its {', '.join(missing)} "
                               f"(observed: {sorted(captured)}; tower {type(self.visual).__name__}, merger "
                               f"{type(self.visual.merger).__name__})")
        grid_thw = image["image_grid_thw"]
        importance, features = vision_signals(captured, grid_thw, self.config.vision_config)
        merge = self.visual.spatial_merge_size
        out, lines, lo = [], [], 0
        for emb, thw in zip(embeds, grid_thw.tolist()):
            rows = slice(lo, lo + emb.shape[0])
            lo += emb.shape[0]
            kept, line = self.select(emb, [(thw[1] // merge, thw[2] // merge)] * thw[0],
                                     None if importance is None else importance[rows],
                                     None if features is None else features[rows],
                                     self.main_embeddings(emb) if needs.embeddings else None)
            out.append(kept)  # Qwen3-VL: the DeepStack channels of the kept tokens come along
            lines.append(line)
        return out, lines

    def pixel_rows(self, kwargs: dict[str, Any]) -> list[int] | None:
        """``t * h * w`` patches per image (``image_grid_thw``)."""
        grid = kwargs.get("image_grid_thw")
        return [] if grid is None else torch.as_tensor(grid).prod(-1).tolist()

    # ------------------------------------------------------------------ positions
    def unpruned_positions(self, tokens: list[int], features: list[Any], offsets: list[int], sizes: list[int]
                           ) -> torch.Tensor:
        """vLLM's own M-RoPE positions of the unpruned prompt (each image's placeholder run restored)."""
        from vllm.multimodal.inputs import PlaceholderRange

        full = [dataclasses.replace(f, mm_position=PlaceholderRange(offset=at, length=size))
                for f, at, size in zip(features, offsets, sizes)]
        return super(PrunedModel, self).get_mrope_input_positions(tokens, full)[0]
