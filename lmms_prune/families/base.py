"""What every model family module says about its architecture (methods.md section 1).

A family is one subclass of :class:`Family` in its own module under ``lmms_prune.families``. The class holds the
facts that do not need a model (default checkpoint, ``--model_args`` of its processor, token-to-pixel geometry,
benchmark geometries, the box convention of grounding answers); an instance, ``Family(model)``, is the
engine's adapter for one loaded model (decoder location, image-token spans and their grids, vision tower and
feature layer, the pre-LLM hand-over).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lmms_prune import geometry as geo
from lmms_prune.efficiency import EncoderDims, encoder_flops, mlp_flops


def feature_layer_index(vision_feature_layer: int, num_layers: int) -> int:
    """The index, in a tower's list of ``num_layers`` layers, of the layer whose output ``vision_feature_layer``
    names in ``hidden_states`` (whose entry 0 is the embeddings: -2 of 24 layers is layer 22); shared by our
    adapters and the vLLM plug-in, which must read the same layer."""
    hidden = vision_feature_layer if vision_feature_layer >= 0 else num_layers + 1 + vision_feature_layer
    return hidden - 1


@dataclass
class ImageSpan:
    """One image's visual tokens inside one sample: ``length`` tokens from sequence index ``start``.

    ``grids`` lists the (rows, cols) of its consecutive token blocks in order (InternVL: one 16x16 grid per
    tile, thumbnail last; Qwen2.5-VL: one (h/28, w/28) grid; LLaVA-1.5: one 24x24 grid; LLaVA-NeXT: the 24x24
    base image and the unpadded mosaic), over its visual tokens: the span's tokens except ``structural``.
    """

    start: int
    length: int
    grids: list[tuple[int, int]] = field(default_factory=list)
    # Positions within the span of structural tokens (LLaVA-NeXT's ``image_newline`` ending each mosaic row):
    # always kept, never scored, not counted in budgets; the grids cover the other tokens, in order.
    structural: tuple[int, ...] = ()
    # The visual-token count the papers quote for this image when it differs from the tokens present
    # (LLaVA-NeXT: 576 x (1 + tiles), their code without unpadding); None when it is the same.
    papers_length: int | None = None
    # True when the span is one video: ``grids`` then holds one (rows, cols) grid per (merged) frame, in time order.
    video: bool = False

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.start, self.start + self.length)

    @property
    def num_visual(self) -> int:
        """Number of visual (non-structural) tokens: what scores, selectors and budgets see."""
        return self.length - len(self.structural)

    @property
    def visual_index(self) -> torch.Tensor:
        """LongTensor[num_visual]: positions within the span of the visual (non-structural) tokens, ascending."""
        keep = torch.ones(self.length, dtype=torch.bool)
        keep[list(self.structural)] = False
        return torch.nonzero(keep).flatten()

    @property
    def visual_positions(self) -> torch.Tensor:
        """Sequence positions of the visual (non-structural) tokens."""
        return self.start + self.visual_index

    @property
    def structural_positions(self) -> torch.Tensor:
        """Sequence positions of the structural tokens."""
        return self.start + torch.tensor(self.structural, dtype=torch.long)


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of True in a 1-D bool tensor, as (start, length)."""
    idx = torch.nonzero(mask, as_tuple=False).flatten().tolist()
    out: list[tuple[int, int]] = []
    for i in idx:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def int_arg(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (strings from the command line are parsed), or a clear error."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    return number


def bool_arg(name: str, value: Any) -> bool:
    """``value`` as a bool (``true``/``false``/``1``/``0``/``yes``/``no`` from the command line), or a clear error."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: must be true or false")


def optional_float_arg(name: str, value: Any) -> float | None:
    """``value`` as a float > 0, or None when unset (``None``, ``""``, ``none``); else a clear error."""
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise ValueError(f"{name}={value!r}: must be a number > 0")
    return number


def check_frames(part: dict[str, Any]) -> list[Any]:
    """The frames of one neutral video part ``{"type": "video", "video": [PIL images]}``, or a clear error."""
    from PIL import Image

    frames = part.get("video")
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ValueError(f"a video part needs 'video': a non-empty list of PIL frames (already sampled), got "
                         f"{type(frames).__name__}")
    bad = [i for i, f in enumerate(frames) if not isinstance(f, Image.Image)]
    if bad:
        raise ValueError(f"video frame {bad[0]} is a {type(frames[bad[0]]).__name__}, not a PIL image: decode "
                         "the video into PIL RGB frames first")
    return [f.convert("RGB") for f in frames]


VOCAB = 2048  # benchmark geometries: a small vocabulary (embedding/LM-head size does not affect prefill)
IMAGE_TOKEN = 2000


def bench_text_config(layers: int, hidden: int, heads: int, kv: int, ffn: int, kind: str) -> dict[str, Any]:
    """The text-model config of a benchmark geometry (random weights, real widths)."""
    cfg = {"vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 32768,
           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    if kind in ("qwen2", "qwen3"):
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if kind == "qwen3":  # Qwen3 states its head width (q/k RMSNorm over it)
        cfg["head_dim"] = hidden // heads
    return cfg


class Family:
    """Base family: the facts of a transformers-native VLM and, bound to a model, the engine's adapter."""

    # ---- facts (class level; reading them loads no model)
    name: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()  # accepted ``config.model_type`` values
    model_class: ClassVar[str] = ""  # transformers class name, for messages and docs
    processor_class: ClassVar[str] = ""  # the transformers processor class of its checkpoints
    default_pretrained: ClassVar[str | None] = None
    # family-specific --model_args, name -> help: those of lmms-eval's own wrapper of the family (same names,
    # meanings and defaults). parse_model_args may add ``default_max_new_tokens`` (that wrapper's default).
    model_args: ClassVar[dict[str, str]] = {}
    # Grounding answers: "grid1000" (``<box>[[x1,y1,x2,y2]]</box>`` on a 0-1000 grid of the original image;
    # InternVL, Qwen2-VL, Qwen3-VL) or "resized_pixels" (absolute pixels of the processor's resized image, e.g.
    # Qwen2.5-VL's ``bbox_2d``) or "unit_padded_square" (``[x1, y1, x2, y2]`` floats in 0-1 of the image padded to
    # a centred square: LLaVA-1.5/1.6's training data; see lmms_prune.families.llava_next.padded_square_box_to_
    # original). LLaVA-1.5 with image_aspect_ratio=crop: "unit_region" (0-1 of the centre crop). Per sample, with
    # the real input geometry: :meth:`box_frame` (lmms_prune.tasks.refcoco.parsing reads answers with it).
    box_convention: ClassVar[str] = "grid1000"
    has_cls: ClassVar[bool] = True
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes")
    video_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values_videos",)
    # name -> benchmark geometry spec (real widths, random weights); see :meth:`build_geometry`.
    bench_geometries: ClassVar[dict[str, dict[str, Any]]] = {}

    # ---- --model_args of the family's processor
    @classmethod
    def parse_model_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        """Pop and validate the family's own ``--model_args`` (:attr:`model_args`) from ``args``."""
        return {}

    @classmethod
    def processor_kwargs(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the processor call for the parsed family options."""
        return {}

    @classmethod
    def prepare_images(cls, images: list[Any], options: dict[str, Any], processor: Any = None) -> list[Any]:
        """The images as the family's own pipeline hands them to its processor (default: unchanged)."""
        return images

    @classmethod
    def loglikelihood_texts(cls, context: str, continuation: str, num_images: int, processor: Any,
                            options: dict[str, Any]) -> tuple[str, str] | None:
        """``(prompt, prompt + continuation)`` texts of a loglikelihood request, built as lmms-eval's own wrapper
        of the family builds them; None where that wrapper has no ``loglikelihood`` (the default)."""
        return None

    @classmethod
    def standalone_images(cls, images: list[Any], processor: Any = None) -> list[Any]:
        """The images as :meth:`prepare_images` hands them over under the family's default options, for calls
        outside a run (calibration, diagnostics, overlays); default: unchanged."""
        return images

    @classmethod
    def video_sampling(cls, options: dict[str, Any]) -> dict[str, Any] | None:
        """How lmms-eval's wrapper of the family samples a video's frames, from the parsed family ``options``:
        ``{"num_frames": N, "fps": F}`` (``fps`` None: ``N`` frames uniformly over the whole video; else frames
        ``F`` per second, at most ``N``), or None when the family takes no videos."""
        return None

    @classmethod
    def prepare_videos(cls, videos: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
        """Processor-call keyword arguments of a batch's videos: ``videos`` are the neutral chat parts
        ``{"type": "video", "video": [PIL frames, already sampled], "fps": sampled frames per second (optional)}``
        in prompt order. Default (families whose processor takes frame lists as they are): ``videos=`` the
        frame lists, not sampled again."""
        if cls.video_sampling(options) is None:
            raise ValueError(f"{cls.name}: this family takes no videos (a request has one); use a video family "
                             "(qwen2_5_vl, qwen3_vl, llava_onevision) or give the frames as images")
        return {"videos": [check_frames(v) for v in videos], "videos_kwargs": {"do_sample_frames": False}}

    @classmethod
    def image_kwargs(cls, max_num: int | None) -> dict[str, Any]:
        """Processor-call keyword arguments for a tile budget (calibration, diagnostics, overlays)."""
        return {}

    # ---- processor-level token budgets (a method that shrinks the input instead of pruning tokens)
    # Why this family cannot meet a visual-token budget by shrinking its images (None: it can, see
    # budget_images); shown before any weights load.
    input_budget_refusal: ClassVar[str | None] = "its processor maps no smaller input to fewer visual tokens"
    # Why a video of this family has structural tokens between its frames (frame labels, timestamps), where a
    # merged video (a shorter sequence with no original places) cannot put them; None: only after the video.
    # Methods that merge videos only are refused for such a family before the weights load (runner).
    video_structure_inside: ClassVar[str | None] = None

    @classmethod
    def check_input_budget(cls, keep_ratio: float | None, keep_tokens: int | None, options: dict[str, Any]) -> None:
        """Raise ``ValueError`` with the reason when this family cannot meet ``keep_ratio`` of each image's visual
        tokens by shrinking its input (:meth:`budget_images`); reads no model."""
        if keep_tokens is not None or keep_ratio is None:
            raise ValueError(f"keep_tokens={keep_tokens!r}: a processor-level budget is a fraction of each image's "
                             "visual tokens; give keep_ratio instead")
        if cls.input_budget_refusal is not None:
            raise ValueError(f"{cls.name} cannot meet a token budget by shrinking its images: "
                             f"{cls.input_budget_refusal}")

    @classmethod
    def budget_images(cls, images: list[Any], keep_ratio: float, options: dict[str, Any],
                      processor: Any = None) -> tuple[list[Any], dict[str, Any]]:
        """The images (as :meth:`prepare_images` returned them) and family options with which the vision tower
        yields about ``keep_ratio`` of the visual tokens it yields for ``images`` under ``options``."""
        cls.check_input_budget(keep_ratio, None, options)
        raise TypeError(f"{cls.name}: input_budget_refusal is None but budget_images is not implemented")

    # ---- grounding answers
    @classmethod
    def box_frame(cls, image_size: Sequence[int], inputs: Any, index: int, options: dict[str, Any],
                  processor: Any = None) -> dict[str, Any]:
        """The box frame of one image of a processed batch: a small JSON-serialisable dict naming the family's
        box convention and the numbers that map an answer's box back to pixels of the original image
        (``lmms_prune.tasks.refcoco.parsing.parse_box_in_frame``).

        ``image_size``: the original ``(width, height)`` (before ``prepare_images``); ``inputs``: the processor's
        output for the batch; ``index``: the image's position among the batch's images; ``options``: the
        request's family options. Default: :attr:`box_convention` on the original image (``grid1000``,
        ``unit_padded_square``); families whose answers depend on the processed input override it.
        """
        width, height = geo.check_size(image_size)
        if cls.box_convention not in ("grid1000", "unit_padded_square"):
            raise TypeError(f"{cls.name}: box_convention={cls.box_convention!r} needs its own box_frame")
        return {"convention": cls.box_convention, "width": int(width), "height": int(height)}

    # ---- token-to-pixel geometry
    @classmethod
    def token_boxes(cls, image_size: Sequence[int], grids: Any, processor: Any = None,
                    max_num: int | None = None) -> torch.Tensor:
        """Float ``[N, 4]`` pixel boxes of one image's visual tokens in the ORIGINAL image (one raster per
        grid, each over the whole image, unless the family says otherwise)."""
        width, height = geo.check_size(image_size)
        return torch.cat([geo.raster((0, 0, width, height), g) for g in geo.grid_list(grids)]).float()

    @classmethod
    def token_views(cls, grids: Any) -> dict[str, torch.Tensor]:
        """Named bool masks ``[N]`` of token subsets that each cover the image once."""
        grid_list = geo.grid_list(grids)
        n = sum(r * c for r, c in grid_list)
        return {"image": torch.ones(n, dtype=torch.bool)}

    @classmethod
    def grid_labels(cls, image_size: Sequence[int], grids: Any, processor: Any = None,
                    max_num: int | None = None) -> list[str]:
        grid_list = geo.grid_list(grids)
        if len(grid_list) == 1:
            return ["image"]
        return [f"frame {t}" for t in range(len(grid_list))]

    @classmethod
    def layout_key(cls, image_size: Sequence[int], grids: Any, processor: Any = None,
                   max_num: int | None = None) -> str:
        """A name of the visual-token layout (maps of one layout can be averaged)."""
        return "grid" + "+".join(f"{r}x{c}" for r, c in geo.grid_list(grids))

    # ---- benchmark geometries (random weights of a real checkpoint's widths)
    @classmethod
    def build_geometry(cls, spec: dict[str, Any], layers: int | None = None) -> nn.Module:
        raise TypeError(f"{cls.name}: this family has no benchmark geometry")

    @classmethod
    def vision_depth(cls, config: Any) -> int:
        """Blocks of the vision tower that ``config`` (a VLM config) builds."""
        return int(config.vision_config.num_hidden_layers)

    @classmethod
    def cut_vision(cls, config: Any, layers: int) -> None:
        """Make ``config`` build only the first ``layers`` blocks of its vision tower (``bench --vision-layers``:
        with random weights the LLM's cost does not depend on the tower's depth)."""
        config.vision_config.num_hidden_layers = layers

    @classmethod
    def synthetic_inputs(cls, model: nn.Module, visual_tokens: int, text: torch.Tensor,
                         gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(pixel_values, extra inputs)`` of one image of ``visual_tokens`` tokens."""
        raise TypeError(f"{cls.name}: this family has no synthetic benchmark inputs")

    @classmethod
    def placeholder_count(cls, model: nn.Module, visual_tokens: int) -> int:
        """Image placeholder tokens of the synthetic image of ``visual_tokens`` visual tokens (more when the
        family adds structural tokens, e.g. LLaVA-NeXT's newlines)."""
        return visual_tokens

    # ---- the adapter (bound to one model)
    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        inner = model.model
        self.language_model: nn.Module = inner.language_model
        self.layers: nn.ModuleList = self.language_model.layers
        self.text_config = self.language_model.config
        self.image_token_id: int = int(self.config.image_token_id)
        video = getattr(self.config, "video_token_id", None)
        video = getattr(self.config, "video_token_index", None) if video is None else video
        self.video_token_id: int | None = None if video is None else int(video)

    @property
    def family(self) -> str:
        return self.name

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def final_norm(self) -> nn.Module:
        """The language model's final norm (DART measures similarity on normed hidden states)."""
        return self.language_model.norm

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_config(self):
        return self.vision_tower.config

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    # ---- theoretical vision cost (efficiency.py's encoder formula) of one request's inputs, from a config
    @classmethod
    def vision_tiles(cls, config: Any, pixels: torch.Tensor, inputs: dict[str, Any], video: bool) -> int:
        """How many tiles / images / frames of ``pixels`` (``[..., C, H, W]``) the tower encodes."""
        return math.prod(int(n) for n in pixels.shape[:-3])

    @classmethod
    def projector_flops(cls, config: Any, patches: int) -> int:
        """The projector over ``patches`` encoded patch rows: LLaVA's 2-layer MLP, vision width -> LM width."""
        width = int(config.get_text_config().hidden_size)
        return mlp_flops(patches, (int(config.vision_config.hidden_size), width, width))

    @classmethod
    def image_structure(cls, processor: Any, inputs: dict[str, Any]) -> list[tuple[int, int | None]] | None:
        """Per image of a processor output: its structural tokens (never pruned: LLaVA-NeXT's row newlines) and
        the papers' visual-token count where it differs from the tokens present (``ImageSpan.papers_length``);
        None for families whose image runs are all visual tokens. Read by runners that see no model (vLLM)."""
        return None

    @classmethod
    def vision_flops(cls, config: Any, inputs: dict[str, Any]) -> int:
        """FLOPs (one multiply-add counted once) of encoding a request's images and videos with the tower that
        ``config`` (a VLM config) describes: every block over each tile (its patches, plus a [CLS] when
        :attr:`has_cls`), the patch embedding and the projector (efficiency.py, methods.md section 8)."""
        vc = config.vision_config
        patch = vc.patch_size if isinstance(vc.patch_size, int) else vc.patch_size[0]
        total = 0
        for key, video in (("pixel_values", False), ("pixel_values_videos", True)):
            pixels = inputs.get(key)
            if pixels is None:
                continue
            tiles = cls.vision_tiles(config, pixels, inputs, video)
            per_tile = (int(pixels.shape[-2]) // patch) * (int(pixels.shape[-1]) // patch)
            dims = EncoderDims(int(vc.hidden_size), int(vc.intermediate_size), int(vc.num_hidden_layers),
                               patch_dim=int(pixels.shape[-3]) * patch * patch)
            total += encoder_flops(dims, tiles * per_tile, [per_tile + int(cls.has_cls)] * tiles)
            total += cls.projector_flops(config, tiles * per_tile)
        return total

    def vision_layers(self) -> nn.ModuleList:
        raise TypeError(f"{self.name}: vision-encoder attention is not available")

    def vision_feature_attention(self) -> nn.Module:
        """The attention module of the vision layer whose output the model feeds to the projector."""
        layers = self.vision_layers()
        fl = self.config.vision_feature_layer
        if not isinstance(fl, int):
            raise ValueError(f"{self.name}: vispruner needs one vision_feature_layer, got {fl!r}")
        return self._attention_of(layers[feature_layer_index(fl, len(layers))])

    def early_vision_attention(self) -> nn.Module:
        """The attention module of the vision tower's early layer ``max(0, L // 4 - 1)`` (the last of its first
        quarter; CLIP-L/14's 24 layers: layer 5, whose [CLS] row VScan's LLaVA code reads as ``attentions[5]``),
        for methods that read the tower's shallow view of the image (``Needs.vision_attention_early``)."""
        layers = self.vision_layers()
        return self._attention_of(layers[max(0, len(layers) // 4 - 1)])

    def frame_query_block(self) -> tuple[nn.Module, int]:
        """``(module, unit)`` for ``Needs.vision_frame_attention``: the vision attention module whose
        rotary-embedded queries and keys give each frame's query attention, and the number of consecutive
        patches (in the tower's order) that one LLM token merges. A family that has one also defines
        ``frame_query_attention(unit_queries, unit_keys, kwargs) -> [num_visual_tokens]`` (prompt order);
        elsewhere a ``ValueError`` says so."""
        raise ValueError(f"{self.name}: its vision tower gives no per-frame query attention "
                         "(Needs.vision_frame_attention: Qwen2-VL and Qwen2.5-VL only); use a method's received-"
                         "attention signal (fastvid_attention='received')")

    # why the family's vision tower cannot host a merge inside it (lmms_prune.engine.tower); None: it can
    tower_refusal: ClassVar[str | None] = "its vision tower hosts no in-tower merge"

    @classmethod
    def check_tower_merge(cls, method: str) -> None:
        """Raise ``ValueError`` with the reason where ``method``'s merge inside the vision tower cannot run on
        this family; reads no model."""
        if cls.tower_refusal is not None:
            raise ValueError(f"method {method!r} merges tokens inside the vision tower, but {cls.name}: "
                             f"{cls.tower_refusal}; use the merge on the tower's output (mustdrop)")

    def tower_layout(self) -> tuple[int, tuple[int, int]]:
        """For a merge inside the vision tower (:mod:`lmms_prune.engine.tower`): ``(prefix, (rows, cols))``, the
        tokens before the patches in each tower call (a [CLS]: 1) and the patch grid. Only a tower whose later
        layers treat their tokens as a set (no positions after the embeddings, no causal or windowed
        attention) and whose patches map one-to-one onto LLM tokens has one: there masking a token as a key is
        removing it. Elsewhere a ``TypeError`` gives the reason (:attr:`tower_refusal`)."""
        raise TypeError(f"{self.name}: {self.tower_refusal}")

    def tower_key_mask(self, attention_mask: torch.Tensor | None, kept: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
        """The ``attention_mask`` a tower layer takes, hiding the keys where ``kept`` ``[B, S]`` is False
        (with :meth:`tower_layout`)."""
        raise TypeError(f"{self.name}: {self.tower_refusal}")

    @staticmethod
    def _attention_of(layer: nn.Module) -> nn.Module:
        return getattr(layer, "self_attn", None) or layer.attention

    def encode_images(self, kwargs: dict[str, Any]):
        return self.model.model.get_image_features(pixel_values=kwargs["pixel_values"], return_dict=True)

    @staticmethod
    def flatten_image_features(pooled) -> torch.Tensor:
        """Projected visual embeddings of every image, in prompt order: [num_visual_tokens, D]."""
        if isinstance(pooled, (list, tuple)):
            return torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled], 0)
        return pooled.reshape(-1, pooled.shape[-1])

    def flatten_pre_projector(self, pre: torch.Tensor, kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """The projector's input as one feature row per visual token, prompt order: [num_visual_tokens, D']."""
        return pre.reshape(-1, pre.shape[-1])

    def cls_importance(self, rows: torch.Tensor) -> torch.Tensor:
        """[images or tiles, H, 1 + P] [CLS] rows -> [num_visual_tokens] VisPruner importance."""
        from lmms_prune.scores import cls_attention

        return torch.cat([cls_attention(r, has_cls=True) for r in rows])

    def vision_importance(self, rows: list[torch.Tensor], kwargs: dict[str, Any]) -> torch.Tensor:
        """VisPruner importance ``[num_visual_tokens]`` (prompt order) from the vision signal the engine
        recorded at :meth:`vision_feature_attention`: with [CLS] (:attr:`has_cls`), the [CLS] rows
        ``[images or tiles, H, 1 + P]`` per call; without, each image's mean received attention ``[P_i]``.
        ``kwargs``: the forward/generate inputs (e.g. the image grids)."""
        return self.cls_importance(torch.cat(rows))

    def padding_masks(self, images: list[list[Any]], options: dict[str, Any],
                      processor: Any = None) -> list[list[torch.Tensor | None]] | None:
        """Per sample, per image (the original images, before :meth:`prepare_images`): bool ``[N visual tokens]``,
        True where the token's patch is at least half padding that the family's pipeline added (LLaVA-1.5's
        pad-to-square), or None; None when the family adds no padding. The engine hands them to the scores
        (``PruneHandle.image_padding``)."""
        return None

    def install_hooks(self) -> list[Any]:
        """Observers the family needs on its model while a pruning handle is installed (each with ``remove()``);
        e.g. LLaVA-NeXT keeps the ``image_sizes`` that ``generate`` hands the image encoder."""
        return []

    def encode_videos(self, kwargs: dict[str, Any]):
        """The videos' encoder output (``pooler_output``: projected embeddings, one row per span token)."""
        raise ValueError(f"{self.name}: pre-LLM methods do not run on videos of this family; use an intra-LLM "
                         "method (fastv, ...)")

    def video_signal_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The forward kwargs the vision-signal methods (:meth:`vision_importance`, :meth:`flatten_pre_projector`)
        read, for the videos' encoder call (Qwen: ``video_grid_thw`` as ``image_grid_thw``)."""
        raise ValueError(f"{self.name}: vision-side signals (vision attention, pre-projector features) are not "
                         "available for videos; use a method on the projected embeddings (divprune) or an "
                         "intra-LLM method")

    def encoder_rows(self, span: ImageSpan) -> torch.Tensor:
        """LongTensor[span.length]: each span token's row in its modality's encoder output, counted from the
        span's first row (-1 for tokens with none, e.g. Qwen3-VL's timestamp text inside a video span)."""
        return torch.arange(span.length)

    def wrap_video_features(self, encoded, kept: torch.Tensor):
        """``encoded`` (from :meth:`encode_videos`) carrying the kept video embeddings ``kept`` [n, D]."""
        return self.wrap_image_features(encoded, kept)

    def wrap_image_features(self, encoded, kept: torch.Tensor):
        encoded.pooler_output = [kept]
        return encoded

    def keep_encoder_extras(self, encoded, rows: torch.Tensor):
        """``encoded`` with its other per-token outputs (beyond ``pooler_output``) reduced to the kept visual
        tokens ``rows`` (indices into :meth:`flatten_image_features`); none by default."""
        return encoded

    def injected_layers(self) -> int:
        """How many first decoder layers get per-token additions to their outputs from the model itself
        (Qwen3-VL's DeepStack); 0 if none."""
        return 0

    def take_injections(self, lm_kwargs: dict[str, Any], first: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Remove from the language model's call ``lm_kwargs`` the additions to the outputs of layers
        ``>= first`` and return them as ``layer -> (bool [B, T] positions, values [positions.sum(), D])``."""
        return {}

    def original_positions(self, input_ids: torch.Tensor, mask2d: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """RoPE positions of the unpruned prompt, [B, T] (as ``generate`` numbers a left-padded batch)."""
        pos = mask2d.long().cumsum(-1) - 1
        return pos.masked_fill(mask2d == 0, 0)

    def pad_token_id(self) -> int:
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        if isinstance(pad, (list, tuple)):
            pad = pad[0] if pad else None
        return int(pad) if pad is not None else 0

    def tokens_per_image(self) -> int:
        return int(self.config.image_seq_length)

    def image_grids(self, run_length: int, image_index: int, forward_kwargs: dict[str, Any],
                    sample: int = 0, start: int = 0) -> list[list[tuple[int, int]]]:
        """Split one run of image tokens into images, each a list of grids."""
        per_image = self.tokens_per_image()
        side = math.isqrt(per_image)
        if run_length % per_image:
            raise ValueError(f"{self.name}: a run of {run_length} image tokens is not a multiple of {per_image}")
        return [[(side, side)] for _ in range(run_length // per_image)]

    def video_grids(self, run_length: int, video_index: int, forward_kwargs: dict[str, Any],
                    sample: int = 0, start: int = 0) -> list[tuple[list[tuple[int, int]], tuple[int, ...]]]:
        """Split one run of video tokens into videos, each ``(grids, structural)``: one grid per (merged) frame
        in time order and the positions within the run of its structural tokens (methods.md section 1)."""
        raise ValueError(f"{self.name}: this family has no video layout; give the frames as images")

    def encoder_modality(self, span: ImageSpan) -> str:
        """Which encoder output holds ``span``'s rows: ``"video"`` (``pixel_values_videos``) for a video span,
        ``"image"`` (``pixel_values``) otherwise; InternVL encodes a video's frames as image tiles."""
        return "video" if span.video else "image"

    def join_videos(self, spans: list[list[ImageSpan]],
                    video_frames: list[list[int | None]] | None) -> list[list[ImageSpan]]:
        """``spans`` with each video the processor wrote as separate image runs joined into ONE video span, from
        ``video_frames`` (per sample, per visual part in prompt order: None for an image, a video's frame
        count). Default: unchanged (the family's processor output already marks its videos)."""
        return spans

    def spans(self, input_ids: torch.Tensor, forward_kwargs: dict[str, Any]) -> list[list[ImageSpan]]:
        """Image and video spans per sample, in sequence order. ``input_ids``: LongTensor[B, T]."""
        out: list[list[ImageSpan]] = []
        image_index = video_index = 0
        for b, row in enumerate(input_ids):
            spans: list[ImageSpan] = []
            found = [(start, length, False) for start, length in runs(row == self.image_token_id)]
            if self.video_token_id is not None and self.video_token_id != self.image_token_id:
                found += [(start, length, True) for start, length in runs(row == self.video_token_id)]
            for start, length, is_video in sorted(found):
                if is_video:
                    videos = self.video_grids(length, video_index, forward_kwargs, b, start)
                    video_index += len(videos)
                    offset = start
                    for grids, structural in videos:
                        n = sum(r * c for r, c in grids) + len(structural)
                        spans.append(ImageSpan(offset, n, grids, structural, video=True))
                        offset += n
                    continue
                images = self.image_grids(length, image_index, forward_kwargs, b, start)
                image_index += len(images)
                offset = start
                for grids in images:
                    n = sum(r * c for r, c in grids)
                    spans.append(ImageSpan(offset, n, grids))
                    offset += n
            out.append(spans)
        return out


def join_frames(pieces: list[ImageSpan]) -> ImageSpan:
    """One video span over its per-frame spans (in time order, one sample): the tokens between them (Qwen3-VL's
    timestamps, InternVL's ``</img>\\nFrame2: <img>``) become structural: kept, never scored, not in the budget."""
    start, end = pieces[0].start, pieces[-1].start + pieces[-1].length
    inside = set()
    for p in pieces:
        inside.update(range(p.start - start, p.start - start + p.length))
    structural = tuple(i for i in range(end - start) if i not in inside)
    return ImageSpan(start, end - start, [g for p in pieces for g in p.grids], structural, video=True)
