"""Decode one sample's video into sampled RGB frames, the way lmms-eval's wrapper of each family does.

Harness-neutral: the lmms-eval layer (``lmms_prune.models.base``) turns a request's video path into neutral
chat content ``{"type": "video", "video": frames}`` with :func:`load_video`; the runner hands the frames
to the family's processor. Frames are decoded with decord, the decoder lmms-eval's Qwen-VL path
(``qwen_vl_utils``), its LLaVA-OneVision wrapper and InternVL's own code use.

Which frames (lmms-eval 0.7.3; each family's video ``--model_args`` with lmms-eval's defaults,
:data:`FAMILY_SAMPLING`):

- ``qwen_vl`` (Qwen2-VL / Qwen2.5-VL / Qwen3-VL, ``lmms_eval.models.chat.qwen2_5_vl`` with
  ``qwen_vl_utils.smart_nframes``): without ``fps``, ``nframes = min(max_num_frames, total)`` floored to an
  even number, at least 2; with ``fps``, ``nframes = total / video_fps * fps`` clamped to
  ``[4, min(768, total)]`` (Qwen3-VL: the upper end is ``max_num_frames``) and floored to an even number.
  Indices ``round(linspace(0, total - 1, nframes))``.
- ``linspace`` (LLaVA-OneVision, ``lmms_eval.models.simple.llava_onevision.load_video``):
  ``int(linspace(0, total - 1, max_frames_num))`` (frames repeat when the video is shorter, as there).
- ``shifted`` (InternVL, ``lmms_eval.models.chat.internvl_hf`` through transformers'
  ``InternVLVideoProcessor.sample_frames``): ``num_frames`` frames, indices ``int(arange(step / 2, total,
  step))`` with ``step = total / num_frames``. With ``fps``, ``int(total / video_fps * fps)`` frames
  (transformers' rule when ``num_frames`` is unset; lmms-eval passes its default ``num_frames=32`` as well,
  and transformers then ignores ``fps``: here a given ``fps`` is honoured). InternVL's processor writes a
  video as one tile per frame; the runner tells the engine which tiles form it (one video span).

Every failure (missing, empty, truncated or undecodable file; too few frames for the rule) is one
:class:`VideoLoadError` naming the sample id and the file, so a harness can count the sample as an error
(``on_error=skip``) instead of failing the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

RULES = ("qwen_vl", "linspace", "shifted")
QWEN_FPS_MIN_FRAMES = 4  # qwen_vl_utils FPS_MIN_FRAMES
QWEN_FPS_MAX_FRAMES = 768  # qwen_vl_utils FPS_MAX_FRAMES
QWEN_FRAME_FACTOR = 2  # qwen_vl_utils FRAME_FACTOR: Qwen-VL merges two frames in time
MAX_FPS = 240.0
"""Upper bound of a sampling rate (frames per second of video): above any common recording rate, so a larger
value can only ask for more frames than a video holds (checked with the other ``--model_args``)."""


class VideoLoadError(ValueError):
    """A sample's video cannot be used (missing, empty, truncated, not a video, too few frames)."""

    def __init__(self, sample_id: Any, where: str, reason: str) -> None:
        self.sample_id = sample_id
        self.where = where
        self.reason = reason
        super().__init__(f"sample {sample_id!r}: video {where} cannot be used: {reason}")


@dataclass(frozen=True)
class FrameSampling:
    """How many frames to take and where: ``rule`` (one of :data:`RULES`), ``num_frames`` (the rule's frame
    count or cap), ``fps`` (frames per second of video, None: ``num_frames`` uniformly) and, for ``qwen_vl``
    with ``fps``, ``max_frames`` (upper end of the frame count, None: ``min(768, total)``)."""

    rule: str
    num_frames: int = 32
    fps: float | None = None
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"frame sampling rule={self.rule!r}: must be one of {RULES}")
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"num_frames={self.num_frames!r}: must be an integer >= 1")
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps)
                                         and 0 < self.fps <= MAX_FPS):
            raise ValueError(f"fps={self.fps!r}: must be a number in (0, {MAX_FPS:g}] frames per second of video "
                             "(or None for num_frames uniformly); typical: 1 or 2")


# family -> (rule, the family's frame-count --model_args key, its fps key or None, lmms-eval's default count,
# whether the count also caps fps sampling)
FAMILY_SAMPLING: dict[str, tuple[str, str, str | None, int, bool]] = {
    "qwen2_vl": ("qwen_vl", "max_num_frames", "fps", 32, False),
    "qwen2_5_vl": ("qwen_vl", "max_num_frames", "fps", 32, False),
    "qwen3_vl": ("qwen_vl", "max_num_frames", "fps", 32, True),
    "llava_onevision": ("linspace", "max_frames_num", None, 32, False),
    "internvl": ("shifted", "num_frames", "fps", 32, False),
}


def family_sampling(family: str, options: Mapping[str, Any] | None = None) -> FrameSampling:
    """The :class:`FrameSampling` of ``family``'s lmms-eval wrapper, from its parsed ``--model_args``
    (``options``; absent keys take lmms-eval's defaults). Raises ``ValueError`` for a family without video."""
    if family not in FAMILY_SAMPLING:
        raise ValueError(f"family {family!r} takes no video input (video families: {', '.join(FAMILY_SAMPLING)})")
    rule, count_key, fps_key, default, caps_fps = FAMILY_SAMPLING[family]
    options = options or {}
    count = options.get(count_key)
    count = default if count is None else count
    fps = options.get(fps_key) if fps_key else None
    try:
        count = int(count)
        fps = None if fps is None or str(fps).strip().lower() in ("", "none") else float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"{count_key}={count!r} / {fps_key}={fps!r}: {count_key} must be an integer >= 1 and "
                         f"{fps_key} a number > 0") from None
    return FrameSampling(rule, count, fps, count if caps_fps else None)


def _floor_even(x: float) -> int:
    return int(math.floor(x / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR)


def frame_indices(total_frames: int, video_fps: float | None, sampling: FrameSampling) -> list[int]:
    """The indices (in ``[0, total_frames)``, non-decreasing) of the frames ``sampling`` takes from a video of
    ``total_frames`` frames at ``video_fps`` frames per second (module docstring for each rule).

    Raises ``ValueError`` when the rule cannot sample this video (no frames; ``qwen_vl`` on a video of fewer
    than 2 frames; ``fps`` without a known ``video_fps``; ``shifted`` asked for more frames than exist).
    """
    if total_frames < 1:
        raise ValueError("the video has no frames")
    fps = sampling.fps
    if fps is not None and not (video_fps and video_fps > 0):
        raise ValueError(f"fps={fps} sampling needs the video's frame rate, which the file does not give")
    if sampling.rule == "qwen_vl":
        if fps is None:
            n = max(QWEN_FRAME_FACTOR, _floor_even(min(sampling.num_frames, total_frames)))
        else:
            low = math.ceil(QWEN_FPS_MIN_FRAMES / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR
            cap = sampling.max_frames if sampling.max_frames is not None else QWEN_FPS_MAX_FRAMES
            high = _floor_even(min(cap, total_frames))
            n = _floor_even(min(max(total_frames / video_fps * fps, low), high, total_frames))
        if not QWEN_FRAME_FACTOR <= n <= total_frames:
            raise ValueError(f"Qwen-VL takes an even number of frames in [2, {total_frames}], got {n} "
                             f"(a video needs at least 2 frames)")
        return [int(i) for i in np.rint(np.linspace(0, total_frames - 1, n))]
    n = sampling.num_frames
    if fps is not None:
        n = int(total_frames / video_fps * fps) if sampling.rule == "shifted" else min(n, int(total_frames /
                                                                                              video_fps * fps))
        if n < 1:
            raise ValueError(f"fps={fps}: a {total_frames / video_fps:.3g} s video gives no frame at this rate")
        if sampling.rule == "shifted" and n > total_frames:
            raise ValueError(f"fps={fps:g} asks for {n} frames of a {total_frames}-frame video recorded at "
                             f"{video_fps:g} fps (InternVL's sampler refuses more frames than exist); give fps <= "
                             f"{video_fps:g}")
    if sampling.rule == "linspace":
        return np.linspace(0, total_frames - 1, n, dtype=int).tolist()
    if n > total_frames:
        raise ValueError(f"num_frames={n} exceeds the video's {total_frames} frames (InternVL's sampler refuses it)")
    step = total_frames / n
    return np.arange(step / 2, total_frames, step).astype(int)[:n].tolist()


def _where(source: Any) -> tuple[str, str]:
    """``(path, how errors name it)`` of a video source: a path, or lmms-eval's ``{"url"|"path"|"video": ...}``."""
    if isinstance(source, Mapping):
        for key in ("url", "path", "video"):
            if isinstance(source.get(key), (str, os.PathLike)):
                source = source[key]
                break
    if isinstance(source, (list, tuple)) and len(source) == 1:
        source = source[0]
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"unsupported video source of type {type(source).__name__} (give a file path)")
    path = os.fspath(source)
    return path, repr(path)


def _open(source: Any, sample_id: Any) -> tuple[Any, str]:
    """``(decord.VideoReader, how errors name the file)`` of one sample's video, or :class:`VideoLoadError`."""
    try:
        path, where = _where(source)
    except ValueError as err:
        raise VideoLoadError(sample_id, repr(source)[:80], str(err)) from err
    if not os.path.isfile(path):
        raise VideoLoadError(sample_id, where, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoLoadError(sample_id, where, "the file is empty (0 bytes)")
    try:
        import decord
    except ImportError as err:
        raise ImportError("video inputs need decord: pip install 'lmms-prune[video]' (or 'decord>=0.6,<0.7')") from err
    try:
        return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1), where
    except (decord.DECORDError, RuntimeError, OSError) as err:
        raise VideoLoadError(sample_id, where, f"{type(err).__name__}: {err}") from err


def _decode(reader: Any, indices: list[int], sample_id: Any, where: str) -> np.ndarray:
    """Frames ``indices`` of ``reader`` as ``[T, H, W, 3]`` uint8, or :class:`VideoLoadError`."""
    import decord

    try:
        frames = reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError, OSError, IndexError) as err:
        raise VideoLoadError(sample_id, where, f"decoding frames {indices}: {type(err).__name__}: {err}") from err
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise VideoLoadError(sample_id, where, f"the decoder returned frames of shape {frames.shape}, expected "
                                               f"({len(indices)}, H, W, 3)")
    return frames


@dataclass
class SampledVideo:
    """One video's sampled frames (RGB PIL images, time order), their indices in the file, and the sampled
    frames' rate ``sample_fps = len(frames) / total_frames * video_fps`` (qwen_vl_utils' formula; Qwen's
    M-RoPE time step), None when the file gives no frame rate."""

    frames: list[Image.Image]
    indices: list[int]
    sample_fps: float | None


def decode_video(source: Any, sample_id: Any, sampling: FrameSampling) -> SampledVideo:
    """Decode the frames ``sampling`` takes from one sample's video file (:func:`load_video`), with their
    indices and rate."""
    reader, where = _open(source, sample_id)
    total, video_fps = len(reader), float(reader.get_avg_fps())
    try:
        indices = frame_indices(total, video_fps, sampling)
    except ValueError as err:
        raise VideoLoadError(sample_id, where, str(err)) from err
    frames = _decode(reader, indices, sample_id, where)
    rate = len(indices) / total * video_fps if video_fps > 0 else None
    return SampledVideo([Image.fromarray(np.ascontiguousarray(f), mode="RGB") for f in frames], indices, rate)


def load_video(source: Any, sample_id: Any, sampling: FrameSampling) -> list[Image.Image]:
    """Decode the frames ``sampling`` takes from one sample's video file, as 8-bit RGB PIL images in time order.

    ``source``: a file path (lmms-eval's video content URL), or a mapping holding it under ``url``/``path``.
    Raises :class:`VideoLoadError` naming ``sample_id`` and the file for a missing, empty or undecodable file,
    a decoder failure on a frame, or a video the rule cannot sample.
    """
    return decode_video(source, sample_id, sampling).frames


def check_video(source: Any, sample_id: Any, sampling: FrameSampling | None = None) -> int:
    """The frame count of one sample's video after decoding its first and last frames and, with ``sampling``
    (e.g. the run's, :func:`run_sampling`), checking that the rule can sample it (a 1-frame clip under Qwen-VL's
    rule cannot); :class:`VideoLoadError` as :func:`load_video` if the file cannot be used."""
    reader, where = _open(source, sample_id)
    total = len(reader)
    if total < 1:
        raise VideoLoadError(sample_id, where, "the video has no frames")
    _decode(reader, sorted({0, total - 1}), sample_id, where)
    if sampling is not None:
        try:
            frame_indices(total, float(reader.get_avg_fps()), sampling)
        except ValueError as err:
            raise VideoLoadError(sample_id, where, str(err)) from err
    return total


_RUN_SAMPLING: dict[str, FrameSampling] = {}


def register_run_sampling(sampling: FrameSampling | None) -> None:
    """Record the frame sampling of this process's run (our lmms-eval wrappers do, when they are made), so a
    task can tell a clip its model could not sample (a video error) from a malformed answer."""
    _RUN_SAMPLING.pop("run", None)
    if sampling is not None:
        _RUN_SAMPLING["run"] = sampling


def run_sampling() -> FrameSampling | None:
    """The frame sampling :func:`register_run_sampling` recorded in this process, or None."""
    return _RUN_SAMPLING.get("run")


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray | Image.Image], fps: float = 4.0) -> None:
    """Write RGB ``frames`` (``[H, W, 3]`` uint8 arrays or PIL images, all one size, even sides) to an mp4 file
    with PyAV (MPEG-4 part 2, in every FFmpeg build). Used for test clips."""
    from fractions import Fraction

    import av

    arrays = [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f, dtype=np.uint8) for f in frames]
    if not arrays:
        raise ValueError("write_video: no frames")
    height, width = arrays[0].shape[:2]
    if height % 2 or width % 2 or any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"write_video: frames must share one shape with even sides, got "
                         f"{sorted({a.shape for a in arrays})}")
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"}
        for array in arrays:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
