"""Conformance of a pruning method: the engine's proofs, run on any preset (``lmms-prune check-method``).

On the tiny random model of each family (:mod:`lmms_prune.toy.models`, float32 on the CPU unless told
otherwise), a preset, built-in or external, is run through the engine and checked against references that do
not share its code path (the same ones the package's own tests use, docs/fidelity.md):

* ``params``: a parameter the method does not read is refused, and its plug-ins read no config field they do
  not declare (``Plugin.params`` / ``used_params``: an undeclared one would be refused when a user sets it);
* ``prune = mask``: pruning equals "mask mode" (full length, the dropped keys masked from the pruning layer on)
  at prefill and at every cached decode step, with the same kept sets (pre-LLM methods: dropping the tokens
  before the LLM at their original positions equals keeping the same set at layer 0 in mask mode);
* ``cache = recompute``: KV-cache decoding equals decoding by full recomputation;
* ``batch = samples``: a left-padded batch of two different prompts equals its samples one by one;
* ``budget 1`` / ``budget N``: with ``keep_tokens=1`` and ``keep_ratio=1`` (multi-stage: ``stage_ratio``) each
  image keeps exactly that many tokens (merging selectors: at most), indices unique, ascending, in ``[0, N)``;
* ``deterministic``: the same run twice keeps the same sets;
* ``video prune = mask``: the prune = mask proof on a 4-frame video, for families with video inputs;
* ``timing``: one bench cell (:class:`lmms_prune.bench.Bench`) of the method's scoring + selection time against
  the LLM prefill it prunes.

A configuration the method, the engine or a family refuses with a ``ValueError`` (a preset that needs a file,
VisionZip's merged tokens on a family that adds per-token features) is "n/a" with that reason; a ``ValueError``
raised by the method's own plug-in code while it runs is a failure. What this cannot prove: that the method is
the paper's method, that it helps accuracy, or anything at real model sizes and dtypes (scripts/gpu_check.sh
runs the engine proofs on CUDA in bf16).

The helpers (:func:`generate`, :func:`steps_close`, :func:`same_tokens`, :func:`image_inputs`,
:func:`video_inputs`, ...) are the package's tests' own (tests/test_engine.py, tests/test_video_engine.py).
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

import lmms_prune
from lmms_prune.methods import PARAMS as METHOD_PARAMS
from lmms_prune.methods import PRESETS, SCORES, SELECTORS
from lmms_prune.presets import PARAMS, PruneConfig, reads, resolve_config, used_params

DECODE_STEPS = 8
VIDEO_FRAMES = 4
# toy families whose processors take videos as one span of frame grids (InternVL feeds frames as tiles)
VIDEO_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava_onevision")
CHECKS = ("params", "prune = mask", "cache = recompute", "batch = samples", "budget 1", "budget N",
          "deterministic", "video prune = mask", "timing")
BATCH_SIZES = ((300, 200), (200, 420))  # InternVL: 1 tile vs 2 tiles + thumbnail -> unequal kept lengths
BATCH_TEXTS = ("Where is the cup?", "Describe the picture in a few words please, with detail.")


# ---------------------------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tolerance:
    """How close two runs must be: exactly equal in float32; within ``atol`` in other dtypes (bf16 keeps 8
    mantissa bits, so the tiny models' logits, |logit| < 2, agree to a few 1e-2)."""

    dtype: torch.dtype = torch.float32

    @property
    def atol(self) -> float:
        return {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}[self.dtype]

    @property
    def exact(self) -> bool:
        return self.dtype == torch.float32


def same(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> bool:
    """Exactly equal in fp32; within the dtype's tolerance otherwise (raises ``AssertionError`` when not)."""
    if tol.exact:
        return torch.equal(a, b)
    torch.testing.assert_close(a.float(), b.float(), atol=tol.atol, rtol=0)
    return True


def steps_close(a: torch.Tensor, b: torch.Tensor, tokens_a: torch.Tensor, tokens_b: torch.Tensor, tol: Tolerance,
                exact: bool = False) -> bool:
    """Decode-step logits ``[B, S, V]`` agree (exactly when ``exact`` in fp32, else within the tolerance). In
    other dtypes only the steps up to the first token that differs are compared: later steps continue different
    texts. Raises ``AssertionError`` (with the largest difference) when they do not."""
    if tol.exact:
        if exact:
            return torch.equal(a, b)
        torch.testing.assert_close(a, b, atol=tol.atol, rtol=0)
        return True
    differ = (tokens_a != tokens_b).flatten(1).any(0).nonzero()
    n = int(differ[0]) + 1 if differ.numel() else a.shape[1]
    torch.testing.assert_close(a[:, :n].float(), b[:, :n].float(), atol=tol.atol, rtol=0)
    return True


def same_tokens(a: torch.Tensor, b: torch.Tensor, steps_a: torch.Tensor, steps_b: torch.Tensor,
                tol: Tolerance) -> bool:
    """Equal generated tokens in fp32. In other dtypes they agree up to the first step where they differ, and
    there the two runs' choices were a near-tie (logits within 2 * atol in the first run): a flip that the
    dtype's rounding explains, after which the texts legitimately part."""
    if tol.exact:
        return torch.equal(a, b)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    steps_a = steps_a.reshape(-1, *steps_a.shape[-2:]).float()
    for row in range(a.shape[0]):
        differ = (a[row] != b[row]).nonzero()
        if differ.numel():
            n = int(differ[0])
            if (steps_a[row, n, a[row, n]] - steps_a[row, n, b[row, n]]).abs().item() > 2 * tol.atol:
                return False
    return True


# ---------------------------------------------------------------------------------------------- inputs
def photo(size: tuple[int, int] = (300, 200), which: str = "coffee") -> Image.Image:
    """A natural photograph from scikit-image (``coffee``, ``astronaut``, ...) resized to ``size``."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, which)()).convert("RGB").resize(size)


def _to(inputs: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    inputs = inputs.to(device)
    for key, value in inputs.items():
        if value.is_floating_point():
            inputs[key] = value.to(dtype)
    return inputs


def image_inputs(family: str, proc: Any, images_per_prompt: Sequence[Sequence[Image.Image]], texts: Sequence[str],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """Processor inputs of one chat prompt per sample (its images, then its text), left-padded as the
    processor's tokenizer pads; InternVL at most two tiles (``max_patches=2``) to stay small."""
    prompts, flat = [], []
    for imgs, text in zip(images_per_prompt, texts):
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": text}]
        prompts.append(proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        flat.extend(imgs)
    kwargs = {"images_kwargs": {"max_patches": 2}} if family.startswith("internvl") else {}
    return _to(proc(images=flat, text=prompts, return_tensors="pt", padding=True, **kwargs), device, dtype)


def moving_square(frames: int = VIDEO_FRAMES, size: tuple[int, int] = (140, 112)) -> list[Image.Image]:
    """``frames`` RGB frames of a red square moving right over a noisy background."""
    rng = np.random.RandomState(0)
    out = []
    for t in range(frames):
        frame = Image.fromarray((rng.rand(size[1], size[0], 3) * 80).astype("uint8"))
        x = 10 + t * 25
        ImageDraw.Draw(frame).rectangle([x, 30, x + 30, 60], fill=(230, 20, 20))
        out.append(frame)
    return out


def video_inputs(proc: Any, with_image: bool = False, text: str = "Where does the square move?",
                 frames: int = VIDEO_FRAMES, fps: float = 1.0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Any:
    """One prompt with a :func:`moving_square` video (after an image when ``with_image``), frames as given
    (Qwen: at ``fps``, so merged frames are ``2 / fps`` seconds apart in M-RoPE time)."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "video"}, {"type": "text", "text": text}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [photo((160, 120))] if with_image else None
    extra = {}
    if type(proc).__name__.startswith("Qwen"):
        extra["video_metadata"] = [{"fps": fps, "total_num_frames": frames, "frames_indices": list(range(frames))}]
    inputs = proc(text=[prompt], images=images, videos=[moving_square(frames)], return_tensors="pt",
                  do_sample_frames=False, **extra)
    return _to(inputs, device, dtype)


# ---------------------------------------------------------------------------------------------- runs
def generate(model: Any, inputs: Any, steps: int = DECODE_STEPS, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``steps`` new tokens: ``(tokens [B, steps], logits [B, steps, V])``."""
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)


@dataclass
class Run:
    """One pruned (or mask-mode) run: prefill logits, the gather index of the pruned sequence in the full one
    (None where nothing was gathered inside the LLM), kept sets per sample per image, greedy tokens and steps."""

    logits: torch.Tensor
    index: torch.Tensor | None
    kept: list[list[list[int]]]
    records: list[Any]
    tokens: torch.Tensor
    steps: torch.Tensor


def run(model: Any, inputs: Any, method: str, mode: str = "prune", decode: int = DECODE_STEPS, **params: Any) -> Run:
    """Apply ``method`` (``mode`` prune or mask), run the prefill and greedy generation of ``decode`` tokens
    (none when 0). The records are generation's (whose position ids follow the left padding, as a harness
    runs a batch), else the prefill's."""
    with torch.no_grad(), lmms_prune.apply(model, method, mode=mode, **params) as handle:
        logits = model(**inputs).logits
        index = handle.state.keep_index
        records = list(handle.records)
        tokens, steps = torch.empty(0), torch.empty(0)
        if decode:
            tokens, steps = generate(model, inputs, decode)
            records = list(handle.records)
    kept = [[k.tolist() for k in rec.kept] for rec in records]
    return Run(logits, None if index is None else index.clone(), kept, records, tokens, steps)


def mask_and_prune(model: Any, inputs: Any, keep: list[int], k_layer: int,
                   decode: int = DECODE_STEPS) -> tuple[Run, Run]:
    """The same kept set ``keep`` (sample-level visual indices) at layer ``k_layer``, in mask mode and pruned."""
    return (run(model, inputs, "fixed", mode="mask", decode=decode, keep_indices=keep, prune_layer=k_layer),
            run(model, inputs, "fixed", decode=decode, keep_indices=keep, prune_layer=k_layer))


def equal_prefill_and_decode(pruned: Run, mask: Run, tol: Tolerance) -> None:
    """Pruned prefill logits equal mask mode's at the kept positions (the pruned run's gather index, or mask
    mode's where the tokens were dropped before the LLM); decode steps and tokens equal."""
    index = pruned.index if pruned.index is not None else mask.index
    full = mask.logits[0] if index is None else mask.logits[0, index[0]]
    torch.testing.assert_close(pruned.logits[0], full, atol=tol.atol, rtol=0, msg=lambda m: f"prefill logits: {m}")
    assert steps_close(pruned.steps, mask.steps, pruned.tokens, mask.tokens, tol), "decode-step logits differ"
    assert same_tokens(pruned.tokens, mask.tokens, pruned.steps, mask.steps, tol), "generated tokens differ"


def kept_problems(records: Sequence[Any]) -> list[str]:
    """What is wrong with the kept indices of every image of every record (empty when all are unique,
    ascending and within the image's ``[0, N)``)."""
    out = []
    for b, rec in enumerate(records):
        for i, (span, kept) in enumerate(zip(rec.spans, rec.kept)):
            k = kept.tolist()
            where = f"sample {b} image {i} (N={span.num_visual})"
            if len(set(k)) != len(k):
                out.append(f"{where}: duplicate indices {sorted({x for x in k if k.count(x) > 1})[:5]}")
            elif k != sorted(k):
                out.append(f"{where}: indices not ascending {k[:8]}")
            if k and (min(k) < 0 or max(k) >= span.num_visual):
                out.append(f"{where}: indices out of range [0, {span.num_visual}): min {min(k)}, max {max(k)}")
    return out


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Result:
    """One cell of the table: ``status`` is ``pass``, ``fail`` or ``n/a``; ``reason`` says why (or, for
    ``timing``, the measurement)."""

    check: str
    family: str
    status: str
    reason: str = ""


class NotApplicable(Exception):
    """The configuration is refused by the method, the engine or the family (not a failure of the method)."""


class _Recording:
    """A config proxy that remembers which of its fields a plug-in reads."""

    def __init__(self, config: Any, seen: set[str]):
        self._config, self._seen = config, seen

    def __getattr__(self, name: str) -> Any:
        if name in PARAMS:
            self._seen.add(name)
        return getattr(self._config, name)


def _plugin_files(cfg: Any) -> set[str]:
    plugins = [SCORES.get(cfg.score), SELECTORS.get(cfg.selector)]
    return {os.path.realpath(inspect.getfile(p)) for p in plugins if p is not None}


def _raised_by_plugin(err: BaseException, cfg: Any) -> bool:
    files = _plugin_files(cfg)
    return any(os.path.realpath(frame.filename) in files for frame in traceback.extract_tb(err.__traceback__))


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class Checker:
    """The checks of one preset on one family's tiny model (see the module docstring)."""

    def __init__(self, preset: str, family: str, model: Any, proc: Any, params: dict[str, Any],
                 tol: Tolerance, device: torch.device | str = "cpu", decode: int = DECODE_STEPS):
        self.preset, self.family, self.model, self.proc = preset, family, model, proc
        self.params, self.tol, self.device, self.decode = dict(params), tol, device, decode
        try:
            self.cfg = resolve_config(preset, **self.params)
        except ValueError as err:
            raise NotApplicable(str(err)) from err
        self.image = image_inputs(family, proc, [[photo()]], ["Where is the cup on the table?"], device, tol.dtype)

    def _run(self, inputs: Any, mode: str = "prune", decode: bool = True, **extra: Any) -> Run:
        """A run; a ValueError raised outside the method's own plug-ins is a refusal (:class:`NotApplicable`)."""
        try:
            return run(self.model, inputs, self.preset, mode=mode, decode=self.decode if decode else 0,
                       **{**self.params, **extra})
        except ValueError as err:
            cfg = self.cfg if not extra else resolve_config(self.preset, **{**self.params, **extra})
            if _raised_by_plugin(err, cfg):
                raise
            raise NotApplicable(str(err)) from err

    def probe(self) -> list[Any]:
        """The first pruned run (refusals surface here), with a recording of the config fields the plug-ins
        read (:meth:`check_params`)."""
        self.read: set[str] = set()
        try:
            handle = lmms_prune.apply(self.model, self.preset, **self.params)
        except ValueError as err:
            raise NotApplicable(str(err)) from err
        try:
            for plugin in [*handle.scores, *handle.selectors]:
                if plugin is not None:
                    plugin.config = _Recording(plugin.config, self.read)
            with torch.no_grad():
                self.model(**self.image)
            records = list(handle.records)
        except ValueError as err:
            if _raised_by_plugin(err, self.cfg):
                raise
            raise NotApplicable(str(err)) from err
        finally:
            handle.remove()
        return records

    def check_params(self) -> str:
        undeclared = sorted(self.read - used_params(self.cfg))
        assert not undeclared, (f"its plug-ins read {', '.join(undeclared)} without declaring it (Plugin.params or "
                                f"used_params): a user's {undeclared[0]}=... would be refused")
        unread = [n for n in sorted(PARAMS) if n not in used_params(self.cfg) and n != "method"]
        if not unread:
            raise NotApplicable("the method reads every parameter")
        name = next((n for n in unread if n in METHOD_PARAMS), unread[0])
        value = PARAMS[name].default
        try:
            resolve_config(self.preset, **self.params, **{name: value})
        except ValueError as err:
            assert "does not use" in str(err), f"{name}={value!r} was refused for another reason: {err}"
            return f"{name}=... refused"
        raise AssertionError(f"{name}={value!r} (a parameter the method does not read) was accepted")

    def check_prune_equals_mask(self, inputs: Any) -> str:
        cfg = self.cfg
        if cfg.stage == "pre_llm" and not cfg.composed:  # composed: the LLM stage's mask mode on the shrunk inputs
            selector = SELECTORS[cfg.selector]
            if getattr(selector, "merges_in_place", False):
                raise NotApplicable("pre-LLM merged tokens hold new values at their slots, which the mask-mode "
                                    "model would see as the originals (the method's own tests prove the slots)")
            if getattr(selector, "merges", False):
                raise NotApplicable("pre-LLM merged tokens are new embeddings with no original position: no "
                                    "mask-mode reference")
            pruned = self._run(inputs, positions="original")
            keep = [sample_index(rec) for rec in pruned.records]
            decode_stage = SELECTORS[cfg.selector].decode_layer(cfg) is not None
            mask = run(self.model, inputs, "fixed", mode="mask", decode=0 if decode_stage else self.decode,
                       keep_indices=keep[0], prune_layer=0)
            if not decode_stage:
                equal_prefill_and_decode(pruned, mask, self.tol)
                return "pre-LLM at original positions = mask at layer 0"
            # a decode-time selection (engine/decode.py) changes the decode steps: the prefill against layer 0,
            # the decode steps against the same method with the dropped KV entries masked instead of gathered
            torch.testing.assert_close(pruned.logits[0], mask.logits[0, mask.index[0]], atol=self.tol.atol, rtol=0,
                                       msg=lambda m: f"prefill logits: {m}")
            equal_prefill_and_decode(pruned, self._run(inputs, mode="mask", positions="original"), self.tol)
            return "pre-LLM at original positions = mask at layer 0; decode-time selection gathered = masked"
        pruned, mask = self._run(inputs), self._run(inputs, mode="mask")
        assert pruned.kept == mask.kept, "kept sets differ between prune and mask mode"
        equal_prefill_and_decode(pruned, mask, self.tol)
        problems = kept_problems(pruned.records)
        assert not problems, "; ".join(problems)
        return ""

    def check_cache(self) -> str:
        """Cached decoding of the method's run equals decoding by full recomputation with its kept set frozen
        (recomputing through the method itself would select again at every step, from other attention rows)."""
        cfg = self.cfg
        if cfg.stage == "none":
            raise NotApplicable("stage none prunes nothing")
        if cfg.multi_stage or cfg.composed:
            raise NotApplicable("a multi-stage kept set (or an LLM stage after a pre-LLM stage) cannot be frozen "
                                "for the recomputation (prune = mask covers its cached decoding)")
        if cfg.stage == "pre_llm" and getattr(SELECTORS[cfg.selector], "merges", False):
            raise NotApplicable("pre-LLM merged tokens are new embeddings: no frozen-set recomputation")
        extra = {"positions": "original"} if cfg.stage == "pre_llm" else {}
        cached = self._run(self.image, **extra)
        keep = sample_index(cached.records[0])
        layer = 0 if cfg.stage == "pre_llm" else cfg.prune_layer
        with torch.no_grad(), lmms_prune.apply(self.model, "fixed", keep_indices=keep, prune_layer=layer):
            full_tokens, full_steps = generate(self.model, self.image, self.decode, use_cache=False)
        assert same_tokens(cached.tokens, full_tokens, cached.steps, full_steps, self.tol), "generated tokens differ"
        assert steps_close(cached.steps, full_steps, cached.tokens, full_tokens, self.tol), "decode steps differ"
        return "" if not extra else "pre-LLM at original positions vs layer 0 recomputed"

    def check_batch(self) -> str:
        sizes, texts = BATCH_SIZES, BATCH_TEXTS
        batch = image_inputs(self.family, self.proc, [[photo(s)] for s in sizes], texts, self.device,
                             self.tol.dtype)
        both = self._run(batch)
        for row, (size, text) in enumerate(zip(sizes, texts)):
            single = self._run(image_inputs(self.family, self.proc, [[photo(size)]], [text], self.device,
                                            self.tol.dtype))
            assert both.kept[row] == single.kept[0], f"sample {row}: kept sets differ from the sample run alone"
            assert same_tokens(both.tokens[row], single.tokens[0], both.steps[row], single.steps[0], self.tol), \
                f"sample {row}: generated tokens differ from the sample run alone"
            assert steps_close(both.steps[row:row + 1], single.steps, both.tokens[row:row + 1], single.tokens,
                               self.tol), f"sample {row}: decode steps differ"
        return ""

    def check_budget(self, full: bool) -> str:
        cfg = self.cfg
        if cfg.stage == "none":
            raise NotApplicable("stage none prunes nothing")
        selector = SELECTORS.get(cfg.selector)
        if selector is not None and selector.videos_only:
            raise NotApplicable(f"selector {cfg.selector!r} prunes videos only (videos_only): an image keeps every "
                                "token")
        if cfg.multi_stage:
            extra = {"stage_ratio": 1.0 if full else 1e-6}
        elif cfg.composed:  # both stages keep everything, or one token each
            extra = {"keep_ratio": 1.0, "stage_ratio": 1.0} if full else {"keep_tokens": 1, "stage_ratio": 1e-6}
        else:
            extra = {"keep_ratio": 1.0} if full else {"keep_tokens": 1}
        result = self._run(self.image, decode=False, **extra)
        # a selector whose own rule sets the count (SparseVLM's rank rule, MustDrop's window merges): reported
        adaptive = selector is not None and selector.adaptive_count(cfg)
        given = ", ".join(f"{k}={v}" for k, v in extra.items())
        counts = []
        for rec in result.records:
            merged = rec.merged if cfg.stage == "pre_llm" and rec.merged else [0] * len(rec.kept)
            for span, kept, added in zip(rec.spans, rec.kept, merged):
                # a pre-LLM merge's tokens: the kept originals and the merged ones (PruMerge+'s are all merged)
                want, got = (span.num_visual if full else 1), kept.numel() + added
                counts.append(f"{got}/{want}")
                assert adaptive or got == want, f"{given}: an image of {span.num_visual} tokens kept {got}, not {want}"
        problems = kept_problems(result.records)
        assert not problems, "; ".join(problems)
        return f"{given}: the merging selector's own count, kept/budget {', '.join(counts)}" if adaptive else given

    def check_deterministic(self, first: list[Any]) -> str:
        again = self._run(self.image, decode=False)
        assert [[k.tolist() for k in r.kept] for r in first] == again.kept, "a second run kept other tokens"
        return ""

    def check_timing(self) -> str:
        from lmms_prune.bench import Bench

        # multi-stage: an average per layer that the first stage's unpruned layers leave reachable
        ratio = 0.5 if self.cfg.multi_stage else (self.cfg.keep_ratio if self.cfg.keep_ratio is not None else 0.25)
        extra = {k: v for k, v in self.params.items() if k != "keep_ratio"}
        if self.cfg.multi_stage:
            extra = {k: v for k, v in extra.items() if k not in ("stage_ratio", "keep_tokens")}
        try:
            cell = Bench(self.model, repeats=2, warmup=1, e2e=False, progress=lambda _: None).run_cell(
                self.preset, ratio, dict(self.image), extra)
        except ValueError as err:
            raise NotApplicable(str(err)) from err
        prefill = cell.llm_prefill_s["median"]
        return (f"selection {cell.select_s * 1e3:.2f} ms = {cell.select_s / prefill:.0%} of the "
                f"{prefill * 1e3:.1f} ms prefill it prunes ({cell.visual_tokens} -> {cell.kept_tokens} tokens)")


def sample_index(rec: Any) -> list[int]:
    """A record's kept sets as indices among its sample's visual tokens (the ``fixed`` selector's input)."""
    out, offset = [], 0
    for span, kept in zip(rec.spans, rec.kept):
        out += [offset + int(k) for k in kept]
        offset += span.num_visual
    return out


def _outcome(check: str, family: str, fn: Callable[[], str]) -> Result:
    try:
        return Result(check, family, "pass", fn() or "")
    except NotApplicable as why:
        return Result(check, family, "n/a", str(why).splitlines()[0][:300])
    except (AssertionError, Exception) as err:  # any error of the method under test is a failure with its reason
        return Result(check, family, "fail", _short(err))


def _calibrated_prior(preset: str, params: dict[str, Any], family: str, model: Any, proc: Any, folder: Path) -> str:
    """A bias prior calibrated on the tiny model itself (methods that need one: ``bias_prior``)."""
    from lmms_prune.calibration import calibrate_prior
    from lmms_prune.engine.prior import save_prior

    cfg = PruneConfig(**{"method": preset, **PRESETS[preset].settings, **params})
    layer = cfg.effective_score_layer
    images = [photo(s, w) for s in BATCH_SIZES for w in ("coffee", "astronaut")]
    prior = calibrate_prior(model, proc, images, layer, max_num=2)
    return str(save_prior(folder / f"{family}.pt", prior.means, prior.counts, prior.meta))


def check_family(preset: str, family: str, params: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", model: Any = None,
                 proc: Any = None, decode: int = DECODE_STEPS, checks: Sequence[str] = CHECKS) -> list[Result]:
    """The ``checks`` (default: all, :data:`CHECKS`) of ``preset`` on ``family``'s tiny model (built here unless
    ``model`` / ``proc`` are given), each after a first run that surfaces refusals."""
    from lmms_prune.toy.models import build_processor, build_tiny_model

    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"checks {unknown}: unknown; choose from {', '.join(CHECKS)}")

    params = dict(params or {})
    if model is None:
        model = build_tiny_model(family, seed=0, dtype=dtype).to(device)
        proc = build_processor(family)
        proc.tokenizer.padding_side = "left"  # batches are left-padded, as generation needs
    tol = Tolerance(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        if "bias_prior" not in params and reads(preset, "bias_prior"):
            params["bias_prior"] = _calibrated_prior(preset, params, family, model, proc, Path(tmp))
        try:
            checker = Checker(preset, family, model, proc, params, tol, device, decode)
            first = checker.probe()
        except NotApplicable as why:
            return [Result(c, family, "n/a", str(why).splitlines()[0][:300]) for c in checks]
        except Exception as err:  # the method fails on its first run: every check fails with that reason
            return [Result(c, family, "fail", f"first run: {_short(err)}") for c in checks]
        def video() -> str:
            if family not in VIDEO_FAMILIES:
                raise NotApplicable("no video inputs in this family")
            return checker.check_prune_equals_mask(video_inputs(proc, device=device, dtype=dtype))

        runs = {"params": checker.check_params,
                "prune = mask": lambda: checker.check_prune_equals_mask(checker.image),
                "cache = recompute": checker.check_cache, "batch = samples": checker.check_batch,
                "budget 1": lambda: checker.check_budget(full=False),
                "budget N": lambda: checker.check_budget(full=True),
                "deterministic": lambda: checker.check_deterministic(first), "video prune = mask": video,
                "timing": checker.check_timing}
        results = [_outcome(check, family, runs[check]) for check in checks]
    return results


def check_method(preset: str, families: Sequence[str] | None = None, params: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu",
                 progress: Callable[[str], None] | None = None) -> list[Result]:
    """:func:`check_family` on each of ``families`` (default: every toy family)."""
    from lmms_prune.toy.models import FAMILIES

    out = []
    for family in families or FAMILIES:
        if progress:
            progress(f"check-method {preset}: {family}")
        out += check_family(preset, family, params, dtype=dtype, device=device)
    return out


def table(results: Sequence[Result]) -> str:
    """One text table (check x family: pass, FAIL, n/a), then every failure's and n/a's reason, numbered."""
    families = list(dict.fromkeys(r.family for r in results))
    checks = list(dict.fromkeys(r.check for r in results))
    cell = {(r.check, r.family): r for r in results}
    notes: dict[str, int] = {}
    width = max(len(c) for c in checks)
    cols = [max(len(f), 8) for f in families]
    lines = ["  ".join([" " * width, *(f.ljust(w) for f, w in zip(families, cols))])]
    for check in checks:
        row = [check.ljust(width)]
        for family, w in zip(families, cols):
            r = cell.get((check, family))
            text = "-" if r is None else {"pass": "pass", "fail": "FAIL", "n/a": "n/a"}[r.status]
            if r is not None and r.status != "pass" and r.reason:
                text += f" [{notes.setdefault(r.reason, len(notes) + 1)}]"
            row.append(text.ljust(w))
        lines.append("  ".join(row).rstrip())
    lines += [""] + [f"[{n}] {reason}" for reason, n in notes.items()]
    timings = [r for r in results if r.check == "timing" and r.status == "pass"]
    lines += [f"timing {r.family}: {r.reason}" for r in timings]
    return "\n".join(lines).rstrip()


def write_json(results: Sequence[Result], path: str | Path, preset: str) -> Path:
    """The results as JSON: ``{"preset", "passed", "results": [{check, family, status, reason}]}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    passed = not any(r.status == "fail" for r in results)
    path.write_text(json.dumps({"preset": preset, "passed": passed, "results": [asdict(r) for r in results]},
                               indent=1))
    return path
