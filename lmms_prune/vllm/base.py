"""What every family's vLLM integration shares (imported by vLLM through :func:`lmms_prune.vllm.register`, via the
family modules next to this one): the budget fixed at prompt processing, one image's selection with the method's
own plug-ins, and the record the cross-engine check reads.

* **Budget at prompt processing.** :class:`BudgetedPrompts` (mixed into the family's multimodal processor)
  replaces each image's placeholder run with ``sel.budget(N)`` placeholders instead of its ``N`` tokens: the
  scheduler, the KV cache and the prompt length all see the pruned prompt.
* **Selection.** :class:`PrunedModel` (mixed into the family's model class) resolves the configuration before any
  module or weight exists and keeps, per image, the tokens :meth:`PrunedModel.select` picks from the signals the
  family observed on vLLM's vision tower: the same score and selector objects (lmms_prune.methods) our
  transformers engine calls, with the same budget.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from lmms_prune import selection as sel
from lmms_prune.engine.attention import query_rows, received_attention
from lmms_prune.families.base import ImageSpan
from lmms_prune.methods import SCORES, SELECTORS
from lmms_prune.methods.base import ImageSignals
from lmms_prune.vllm import mrope_override, pruning_config
from lmms_prune.vllm.items import content_key, embed_run, split_kwargs

# Where the worker appends one JSON line per pruned image (the cross-engine check reads it); unset: nothing.
RECORD_ENV = "LMMS_PRUNE_VLLM_RECORD"
# under vLLM's own logger, whose handler vLLM configures (a logger outside the "vllm" name space prints nothing)
logger = init_logger("vllm.lmms_prune")


class BudgetedPrompts:
    """Mixed in before a family's multimodal processor: each image's placeholder run cut to the method's budget.
    Each pruned prompt is logged with its length before and after (``lmms_prune: prompt ... tokens``), the line
    that front ends such as lmms-eval's ``vllm`` model show."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        cfg = pruning_config(self.info.get_hf_config())
        if cfg is None:
            return updates
        cuts = self.__dict__.setdefault("_cuts", [])  # (visual tokens, placeholders) per image of this prompt
        return [_budgeted(u, cfg, cuts, lambda item: self.structural_tokens(mm_items, item)) for u in updates]

    def structural_tokens(self, mm_items: Any, item_idx: int) -> int:
        """How many of image ``item_idx``'s placeholders are structure that is always kept and never counted in
        the budget (LLaVA-NeXT's row newlines); 0 for families without such tokens."""
        return 0

    def apply(self, inputs, timing_ctx):
        self._cuts: list[tuple[int, int]] = []
        out = super().apply(inputs, timing_ctx)
        if pruning_config(self.info.get_hf_config()) is None:
            return out
        after = len(out["prompt_token_ids"])
        kept = [r.length for r in out["mm_placeholders"].get("image", [])]
        # vLLM's processor cache replays an image's placeholder run without calling the replacement again: the
        # count before pruning is then unknown here (the run is the budget all the same)
        cuts = self._cuts if len(self._cuts) == len(kept) else []
        before = after + sum(n - k for n, k in cuts) if cuts else "?"
        logger.info("lmms_prune: prompt %s -> %d tokens (image placeholders: %s)", before, after,
                    ", ".join(f"{n} -> {k}" for n, k in cuts) if cuts else kept)
        return out


def _budgeted(update: PromptReplacement, cfg: Any, cuts: list[tuple[int, int]],
              structural: Any = lambda item: 0) -> PromptReplacement:
    """The same replacement with ``sel.budget(N - s) + s`` embedding placeholders per image instead of its ``N``
    (``s = structural(item_idx)``: tokens kept outside the budget, LLaVA-NeXT's row newlines), each
    ``(N, placeholders)`` appended to ``cuts`` (videos are refused). A replacement that is all placeholders (Qwen,
    LLaVA) is cut to the budget; one with tokens around its placeholders (InternVL's ``<img>`` ... ``</img>``,
    a ``PromptUpdateDetails`` whose ``is_embed`` marks them) keeps those tokens and cuts its one placeholder run."""
    full = update.replacement

    def replacement(item_idx: int) -> Any:
        if update.modality != "image":
            raise ValueError(f"lmms_prune: {update.modality} inputs are not pruned by the vLLM plug-in yet; send "
                             "images, or serve without hf_overrides['lmms_prune']")
        tokens = full(item_idx)
        if not isinstance(tokens, PromptUpdateDetails):
            s = structural(item_idx)
            n = sel.budget(len(tokens) - s, keep_ratio=cfg.keep_ratio, keep_tokens=cfg.keep_tokens) + s
            cuts.append((len(tokens), n))
            return tokens[:1] * n
        ids = list(tokens.full)
        embed = (torch.ones(len(ids), dtype=torch.bool) if tokens.is_embed is None
                 else tokens.is_embed(ids).bool())
        where = torch.nonzero(embed).flatten().tolist()
        lo, hi = where[0], where[-1] + 1
        if len(where) != hi - lo:
            raise ValueError("lmms_prune: this family's image placeholders are not one run (text between them); "
                             "the plug-in cannot cut them to a budget")
        n = sel.budget(hi - lo, keep_ratio=cfg.keep_ratio, keep_tokens=cfg.keep_tokens)
        cuts.append((hi - lo, n))
        return PromptUpdateDetails(full=ids[:lo] + ids[lo:lo + 1] * n + ids[hi:], is_embed=tokens.is_embed)

    return PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)


def record(lines: list[dict[str, Any]]) -> None:
    """Append one JSON line per pruned image to the file :data:`RECORD_ENV` names (nothing where it is unset)."""
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


class PrunedModel:
    """Mixed in before vLLM's model class of a family; with ``hf_overrides['lmms_prune']`` the family's
    ``embed_multimodal`` keeps only the method's tokens of each image (:meth:`select`). Without the key every
    method defers to vLLM's own."""

    # vLLM's M-RoPE interface (vllm.model_executor.models.interfaces.SupportsMRoPE): vLLM asks a model for its
    # prompt's positions (get_mrope_input_positions) when its config declares M-RoPE. The Qwen-VL models do; a 1-D
    # RoPE family does with positions='original' and the rotation-preserving override mrope_override() names.
    supports_mrope = True
    # whether the family's LLM has 1-D RoPE (LLaVA, InternVL), whose positions='original' needs mrope_override
    one_d_rope = True

    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        self.prune = pruning_config(vllm_config.model_config.hf_config)  # before any module or weight
        if self.prune is not None:
            if (self.prune.positions != "contiguous" and self.one_d_rope
                    and not vllm_config.model_config.uses_mrope):
                override = json.dumps(mrope_override(vllm_config.model_config.hf_config))
                raise ValueError(f"lmms_prune: positions={self.prune.positions!r} on a 1-D RoPE model: vLLM numbers "
                                 "its prompt by token index unless the config declares M-RoPE; add the override "
                                 f"{override} to hf_overrides (the same rotation: all three M-RoPE rows hold the "
                                 "token's 1-D position, docs/serving.md), or use positions='contiguous'")
            self.check_served(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self.prune is None:
            return
        self.stage_needs = self.prune.needs()
        self.score = SCORES[self.prune.score](self.prune)
        self.selector = SELECTORS[self.prune.selector](self.prune)
        self.check_built()

    def check_served(self, vllm_config: Any) -> None:
        """Raise ``ValueError`` with the reason where this checkpoint or engine setting cannot be served pruned
        (runs before any module or weight exists)."""

    def check_built(self) -> None:
        """As :meth:`check_served`, for what only the built model tells (its weights are not loaded yet)."""

    # ------------------------------------------------------------------ the encoder call
    def embed_multimodal(self, **kwargs: object):
        """vLLM's encoder call. ``positions="contiguous"``: the family's selection over the call's images
        (:meth:`select_images`). ``positions="original"``: image by image, the selection that
        :meth:`get_mrope_input_positions` made for it when vLLM added its request (:meth:`selection`)."""
        if self.prune is None:
            return super().embed_multimodal(**kwargs)
        if self.prune.positions == "contiguous":
            rows, lines = self.select_images(kwargs)
            record(lines)
            return tuple(rows)
        return tuple(self.selection(item)[0] for item in self.single_items(kwargs))

    def select_images(self, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """The family's selection for an encoder call's ``kwargs``: per image, the rows that replace its embeddings
        and its record line (:meth:`select`); empty lists without images."""
        raise NotImplementedError

    def pixel_rows(self, kwargs: dict[str, Any]) -> list[int] | None:
        """Families whose ``pixel_values`` concatenate all images' rows (Qwen's patches, InternVL's tiles): the rows
        of each image; None where ``pixel_values`` is batched, one entry per image (LLaVA, NeXT, OneVision)."""
        return None

    def single_items(self, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
        """An encoder call's ``kwargs`` as one call per image, each as vLLM batches that image alone."""
        rows = self.pixel_rows(kwargs)
        if rows is not None:
            return split_kwargs(kwargs, len(rows), {"pixel_values": rows})
        pixels = kwargs.get("pixel_values")
        return split_kwargs(kwargs, 0 if pixels is None else len(pixels))

    def selection(self, item: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """One image's kept rows and record line, computed once per image content (``item``: one image's encoder
        kwargs): ``positions="original"`` needs the kept tokens twice, for the prompt's positions (when vLLM adds
        the request) and for its embeddings (when vLLM runs the encoder). The tower runs on the image alone
        whenever it runs (a cache miss included), so both see the same numbers whatever else a batch holds."""
        cache = self.__dict__.setdefault("_selections", OrderedDict())
        key = content_key(item)
        if key not in cache:
            rows, lines = self.select_images(item)
            if len(rows) != 1:
                raise RuntimeError(f"lmms_prune: one image's encoder call gave {len(rows)} selections")
            record(lines)
            cache[key] = (rows[0], lines[0])
            while len(cache) > SELECTION_CACHE:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return cache[key]

    # ------------------------------------------------------------------ positions
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """The prompt's ``[3, T']`` positions and the decoding delta, asked by vLLM in the worker when it adds the
        request (M-RoPE models: the Qwen-VL families; 1-D RoPE families with :func:`mrope_override`).

        ``positions="contiguous"``: ``0..T'-1`` in all three rows, as our transformers engine numbers the
        shortened prompt it hands ``generate``; decoding continues at ``T'``. ``positions="original"`` (GAP's
        rule, our engine's ``original``): the unpruned prompt's positions (:meth:`unpruned_positions`) at the
        kept tokens and all text tokens; decoding continues where the unpruned prompt's would. The selection
        runs here, on each image's processed pixels (:meth:`selection`), and the encoder call reuses it."""
        if self.prune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        if self.prune.positions == "contiguous":
            return torch.arange(len(input_tokens)).expand(3, -1).clone(), 0
        from vllm.multimodal.utils import group_and_batch_mm_kwargs

        device = next(self.parameters()).device
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        runs = []
        for feature in features:
            if feature.modality != "image" or feature.data is None:
                raise ValueError(f"lmms_prune: positions='original' needs each image's pixels when vLLM adds the "
                                 f"request (got a {feature.modality!r} item with data={feature.data!r})")
            _, _, item = next(group_and_batch_mm_kwargs([(feature.modality, feature.data)], device=device))
            _, line = self.selection(item)
            at, n = embed_run(feature.mm_position)
            runs.append((at, n, line["run_size"], line["run_kept"]))
        tokens, offsets, keep = sel.restore_runs(list(input_tokens), runs)
        positions = sel.gap_positions(self.unpruned_positions(tokens, features, offsets, [r[2] for r in runs]), keep)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def unpruned_positions(self, tokens: list[int], features: list[Any], offsets: list[int], sizes: list[int]
                           ) -> torch.Tensor:
        """``[3, T]`` positions of the unpruned prompt ``tokens`` (each image's run, of ``sizes[i]`` embedding
        tokens, restored at ``offsets[i]``): 1-D RoPE, the token index in all three rows."""
        return torch.arange(len(tokens)).expand(3, -1).clone()

    def select(self, emb: torch.Tensor, grids: list[tuple[int, int]], importance: torch.Tensor | None,
               features: torch.Tensor | None, embeddings: torch.Tensor | None, keys: torch.Tensor | None = None,
               cls: torch.Tensor | None = None, structural: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[str, Any]]:
        """The rows that replace one image's ``emb`` ``[N, ...]`` and its record line: the method's score and
        selector on the image's signals (``importance`` ``[N]`` vision attention, ``features`` ``[N, C]`` projector
        inputs, ``embeddings`` ``[N, D]`` projected tokens, ``keys`` ``[N, d]`` the feature layer's keys, ``cls``
        ``[D]`` the projected [CLS], each None where the method does not need it or the family has none;
        ``grids``: the image's token grid per frame), with the budget of its ``N`` tokens. ``structural``: the
        rows of the run that are structure (LLaVA-NeXT's row newlines, as our engine's ``ImageSpan.structural``):
        never scored, never counted in the budget, always kept in their places; the signals then have a row for
        every token of the run, and the selection sees the other rows only, as in our engine.

        A subset (:func:`lmms_prune.selection`'s kept indices) gives the kept rows in prompt order; a merge
        (:class:`lmms_prune.selection.Merge`, VisionZip) gives ``[prefix; kept rows; merged rows]`` as our engine
        builds them (:func:`lmms_prune.selection.merged_embeddings`), as many as the budget."""
        span = ImageSpan(start=0, length=emb.shape[0], grids=grids, structural=tuple(structural))
        n_tokens = span.num_visual
        visual = span.visual_index.to(emb.device) if structural else None

        def rows(x: torch.Tensor | None) -> torch.Tensor | None:
            return x if x is None or visual is None else x[visual.to(x.device)]

        signals = ImageSignals(
            sample=0, span=span, offset=0, sample_visual=n_tokens, device=emb.device, vision_attention=rows(importance),
            vision_features=rows(features), embeddings=rows(embeddings), vision_keys=rows(keys), vision_cls=cls)
        n = sel.budget(n_tokens, keep_ratio=self.prune.keep_ratio, keep_tokens=self.prune.keep_tokens)
        score = self.score(signals)
        result = self.selector(signals, score, n)
        line = {"visual_before": n_tokens, "scores": None if score is None else score.float().tolist()}
        if isinstance(result, sel.Merge):
            if structural:
                raise ValueError(f"lmms_prune: method {self.prune.method!r} merges tokens, but this family's images "
                                 "have structural tokens (row newlines) inside them that a merged sequence cannot "
                                 "place (our engine refuses it too)")
            if result.slots is not None:
                raise ValueError(f"lmms_prune: method {self.prune.method!r} places merged tokens at removed tokens' "
                                 "positions, which the plug-in's budgeted placeholder run cannot hold")
            rows = sel.merged_embeddings(emb, result)
            if rows.shape[0] != n:
                raise RuntimeError(f"lmms_prune: method {self.prune.method!r} gave {rows.shape[0]} tokens for a "
                                   f"budget of {n} placeholders")
            return rows, line | {"kept": result.index.tolist(), "merged": result.added}
        kept = result.sort().values.to(emb.device)
        if visual is None:
            return emb[kept], line | {"kept": kept.tolist(), "merged": 0, "run_size": emb.shape[0],
                                      "run_kept": kept.tolist()}
        # the structural rows stay in their places, as our engine keeps them (pre_llm.shrink_inputs)
        run = torch.cat([torch.tensor(structural, dtype=torch.long, device=emb.device), visual[kept]]).sort().values
        return emb[run], line | {"kept": kept.tolist(), "merged": 0, "run_size": emb.shape[0],
                                 "run_kept": run.tolist()}


@contextmanager
def observe_encoder(kernel: torch.nn.Module, projector: torch.nn.Module, needs: Any, keys: bool = False,
                    layer: torch.nn.Module | None = None, received: bool = False) -> Iterator[dict[str, Any]]:
    """Observe one vision layer of a vLLM tower with a [CLS] token (read-only, undone on exit): at its attention
    ``kernel`` the [CLS] rows ``[B, H, S]`` (``"cls"``, ``Needs.vision_attention``: softmax over all keys with the
    kernel's scale, as our engine's ``attention.query_rows``) and, where ``keys``, the keys ``[B, S, d]`` heads
    averaged in float32 (``"keys"``, ``Needs.vision_keys``, as our engine's observer); ``layer``'s output
    ``[B, S, D]`` (``"states"``, ``Needs.vision_cls``); and the ``projector``'s input (``"pre"``,
    ``Needs.vision_features``; the calls' inputs concatenated where the family projects image by image). A tower
    without a [CLS] token (``received``, SigLIP) gives each token's mean received attention ``[B, S]`` instead of the
    [CLS] rows (``"received"``, as our engine's ``attention.received_attention``)."""
    keys = keys and needs.vision_keys
    states = layer is not None and needs.vision_cls
    attention = "received" if received else "cls"
    expected = {key: name for key, name, on in (
        (attention, f"{'received' if received else '[CLS]'} attention", needs.vision_attention), ("keys", "keys", keys),
        ("states", "feature layer's output", states), ("pre", "projector input", needs.vision_features)) if on}
    out: dict[str, Any] = {"_expected": expected}
    hooks = []
    if needs.vision_attention or keys:
        def grab_qk(module, args, kwargs):
            q, k = encoder_qk(module, args, kwargs)  # [B, H, S, d]
            if needs.vision_attention and received:
                out["received"] = received_attention(q, k, module.scale)
            elif needs.vision_attention:
                out["cls"] = query_rows(q, k, module.scale, rows=slice(0, 1))[:, :, 0]
            if keys:
                out["keys"] = k.float().mean(1)

        hooks.append(kernel.register_forward_pre_hook(grab_qk, with_kwargs=True))
    if states:
        forward = layer.forward

        def observed(x, *args, **kwargs):
            y = forward(x, *args, **kwargs)
            out["states"] = (y[0] if isinstance(y, tuple) else y).detach()
            return y

        layer.forward = observed  # an instance attribute, deleted on exit
    if needs.vision_features:
        wrap_forward(projector, out, "pre")
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
        unwrap_forward(projector)
        if states:
            unwrap_forward(layer)


def check_observed(captured: dict[str, Any], where: str) -> None:
    """Raise ``RuntimeError`` naming the signals :func:`observe_encoder` hooked but did not see (its
    ``"_expected"``: key -> name)."""
    missing = [name for key, name in captured.get("_expected", {}).items() if key not in captured]
    if missing:
        raise RuntimeError(f"lmms_prune: {where} ran without the hooks seeing its {', '.join(missing)} "
                           f"(observed: {sorted(k for k in captured if not k.startswith('_'))})")


# images whose selection the plug-in keeps between the positions and the encoder call (positions='original')
SELECTION_CACHE = 64


def pixel_input(image: Any) -> Any:
    """The parsed image input, refused where it holds precomputed embeddings (no tower runs, so no signal)."""
    if image is not None and image["type"] != "pixel_values":
        raise ValueError("lmms_prune: precomputed image embeddings carry no vision-tower signals; send pixels")
    return image


def encoder_qk(module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``q``, ``k`` ``[B, H, S, d]`` (detached) from a forward pre-hook's arguments of vLLM's encoder attention
    kernel (``MMEncoderAttention(query, key, value)`` with ``[B, S, H * d]`` inputs), for the [CLS] row and the
    keys our engine's observer reads at the same point."""
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs["key"]
    heads, dim = module.num_heads, module.head_size
    q = query.detach().reshape(query.shape[0], -1, heads, dim).transpose(1, 2)
    k = key.detach().reshape(key.shape[0], -1, heads, dim).transpose(1, 2)
    return q, k


def wrap_forward(module: torch.nn.Module, out: dict[str, Any], key: str) -> None:
    """Observe ``module``'s first input as ``out[key]`` (detached; several calls' inputs concatenated along the
    first dimension, in call order) by wrapping its ``forward`` in an instance
    attribute (undo with :func:`unwrap_forward`). A forward pre-hook on such a module is not called in vLLM 0.32's
    CPU worker (seen in scripts/vllm_check.sh), so the call itself is wrapped."""
    forward = module.forward

    def observed(x, *args, **kwargs):
        seen = out.get(key)
        out[key] = x.detach() if seen is None else torch.cat([seen, x.detach()])  # called once per image
        return forward(x, *args, **kwargs)

    module.forward = observed


def unwrap_forward(module: torch.nn.Module) -> None:
    module.__dict__.pop("forward", None)
