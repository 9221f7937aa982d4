"""Efficiency benchmark: what pruning buys, measured side by side against the unpruned model.

For every cell (method x keep ratio x visual-token count) on one model (a real checkpoint, or random weights of
a named real geometry built locally), it measures in the same process and run:

* LLM prefill time (vision encoding excluded: pruning inside the LLM cannot save it), per decoder layer;
* end-to-end time to first token (TTFT, ``generate`` from pixels) and decode time per token, both read off one
  ``generate`` call by a per-step clock, and where the TTFT goes (:mod:`lmms_prune.timing`: setup, vision tower
  + projector, hand-over, selection, LLM prefill, head; they add up to the TTFT);
* the engine's scoring + selection time, the theoretical prefill FLOPs (methods.md section 8, from the
  per-layer token counts the engine reports) and KV-cache bytes, the vision tower's FLOPs, and peak memory;
* speed-ups against the unpruned model: of the LLM prefill (measured, theoretical, their ratio) and of the
  whole request (measured TTFT; theoretical ``(V + P) / (V + P')`` with the vision FLOPs ``V``);
* optionally the "reference" scoring path (eager attention everywhere with ``output_attentions=True``, as the
  methods' original implementations do) for the same cell, time and peak memory.

With ``--vision-layers N`` the vision tower keeps its first ``N`` blocks (random weights: the LLM's cost does not
depend on the tower's depth); the vision time is extrapolated to the full tower (each missing block takes the
mean time of the blocks run) and the vision FLOPs are those of the full tower.

With ``--layers N`` a truncated stack of ``N`` decoder layers runs and full-depth figures are extrapolated
from the per-layer times (layers before the pruning layer at full length, the rest at pruned length); the
output says so. The stack's layers stand for the model's first ``N``: each full-depth layer ``i < N`` counts
(and takes the time of) the stack's layer ``i``, every later layer the stack's last layer's token count and the
mean time of the stack's layers at that count. Multi-stage methods (``prune_layers``) therefore need their
stages inside the stack (explicit ``prune_layers`` < ``N``; ``auto`` would scale to the stack and is refused).

Budgets: ``keep`` is each method's ``keep_ratio`` as run (per-method ``--method-args`` override ``--keep``);
for multi-stage methods it is the average visual tokens per layer. The ``avg/layer`` column (mean visual tokens
per full-depth layer) and the theoretical speed-up show which cells have equal FLOPs.

A truncated run's TTFT is extrapolated the same way: the measured TTFT plus the time of the missing decoder
layers (the prefill's extrapolation) and of the missing vision blocks.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmms_prune.efficiency import DecoderDims, end_to_end_ratio, kv_cache_bytes, prefill_flops
from lmms_prune.engine import apply
from lmms_prune.families import all_families, get_adapter
from lmms_prune.methods import SELECTORS
from lmms_prune.timing import PhaseClock, ttft_parts


def geometries() -> dict[str, tuple[Any, dict[str, Any]]]:
    """Every benchmark geometry: name -> (family, spec), from the family modules' ``bench_geometries``."""
    return {name: (fam, spec) for fam in all_families() for name, spec in fam.bench_geometries.items()}


def build_geometry(name: str, layers: int | None = None, vision_layers: int | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """A random-weight transformers-native VLM with the real geometry ``name``, optionally ``layers`` decoder
    layers and ``vision_layers`` vision blocks deep, built in ``dtype`` (default float32; a 7B LLM in bfloat16
    never passes through its 28 GB float32 copy). ``model.bench_full_config`` keeps the full geometry's config
    (the theoretical vision FLOPs count the whole tower)."""
    import copy

    table = geometries()
    if name not in table:
        raise ValueError(f"--geometry {name!r}: unknown; choose one of {', '.join(table)}")
    fam, spec = table[name]
    if layers is not None and not 1 <= layers <= spec["text"][0]:
        raise ValueError(f"--layers {layers}: {name} has {spec['text'][0]} decoder layers; give 1..{spec['text'][0]}")
    cls, config = fam.build_geometry(spec, layers)
    full_config = copy.deepcopy(config)
    if vision_layers is not None:
        depth = fam.vision_depth(config)
        if not 1 <= vision_layers <= depth:
            raise ValueError(f"--vision-layers {vision_layers}: {name}'s vision tower has {depth} blocks; "
                             f"give 1..{depth}")
        fam.cut_vision(config, vision_layers)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls._from_config(config, dtype=dtype or torch.float32).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # never stop early: every run decodes the same number of tokens
    model.bench_full_config = full_config
    return model


def synthetic_inputs(model: nn.Module, visual_tokens: int, text_tokens: int = 48) -> dict[str, torch.Tensor]:
    """One prompt with ``visual_tokens`` image tokens (the family's synthetic image: InternVL 256 per tile;
    LLaVA-1.5: 576; Qwen2.5-VL: a near-square grid) and random pixels, around ``text_tokens`` ordinary tokens."""
    adapter = get_adapter(model)
    image_id = adapter.image_token_id
    gen = torch.Generator().manual_seed(0)
    vocab = min(int(model.config.get_text_config().vocab_size), image_id)
    text = torch.randint(3, max(4, vocab - 1), (text_tokens,), generator=gen)
    pixels, extra = type(adapter).synthetic_inputs(model, visual_tokens, text, gen)
    video = "video_grid_thw" in extra  # a video geometry: one synthetic video instead of an image
    token_id = adapter.video_token_id if video else image_id
    head, tail = text[: text_tokens // 4], text[text_tokens // 4:]
    placeholders = type(adapter).placeholder_count(model, visual_tokens)
    ids = torch.cat([head, torch.full((placeholders,), token_id), tail])[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values_videos" if video else "pixel_values": pixels, **extra}
    if "image_grid_thw" in extra or video:  # M-RoPE families number the visual tokens by their token type
        inputs["mm_token_type_ids"] = (ids == token_id).long() * (2 if video else 1)
    return inputs


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that RSS growth measures this
    block's allocations rather than what earlier blocks left in the allocator."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement is only less precise
        pass


class StepClock:
    """A ``generate`` stopping criterion that never stops and records when each new token is ready: the first
    call follows the prefill (time to first token), the later ones are decode steps."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field of this process, in KiB."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) of this process to its current RSS (Linux:
    writing 5 to ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return _status_kib("VmHWM") <= _status_kib("VmRSS") + 4  # the reset took (a page or so may arrive)
    except (OSError, KeyError, ValueError):
        return False


class PeakRSS:
    """Memory the block adds at its peak above its start: the peak CUDA allocation (GPU); on the CPU, the
    kernel's resident-set high-water mark, reset at entry (Linux, exact and free), or where that is unavailable,
    the resident set sampled every 2 ms by a thread (``sampler`` is then True: the thread shares the cores, so
    :class:`Bench` runs it in an untimed call only)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.sampler = device.type != "cuda" and not _reset_rss_peak()
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_memory()
        if not self.sampler:
            self._start = 1024 * _status_kib("VmRSS")
            _reset_rss_peak()
            return self
        import psutil

        proc = psutil.Process()
        self._start = self.peak = proc.memory_info().rss

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, proc.memory_info().rss)

        self._stop.clear()
        self._thread = threading.Thread(target=sample, name="lmms-prune-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        elif not self.sampler:
            self.peak = max(0, 1024 * _status_kib("VmHWM") - self._start)
        else:
            self._stop.set()
            self._thread.join()
            self.peak -= self._start


class LayerTimer:
    """Time of each decoder layer during one forward: CUDA events on a GPU (read once after the forward), the
    wall clock otherwise."""

    def __init__(self, layers: nn.ModuleList, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self._times = [0.0] * len(layers)
        self._t0 = [0.0] * len(layers)
        self._events: list[list[Any]] = [[None, None] for _ in layers]
        self._hooks = []
        for i, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._start(i)))
            self._hooks.append(layer.register_forward_hook(self._end(i)))

    def _start(self, i):
        def hook(module, args):
            if self.cuda:
                self._events[i][0] = torch.cuda.Event(enable_timing=True)
                self._events[i][0].record()
            else:
                self._t0[i] = time.perf_counter()
        return hook

    def _end(self, i):
        def hook(module, args, output):
            if self.cuda:
                self._events[i][1] = torch.cuda.Event(enable_timing=True)
                self._events[i][1].record()
            else:
                self._times[i] = time.perf_counter() - self._t0[i]
        return hook

    @property
    def times(self) -> list[float]:
        """Seconds per layer of the last forward."""
        if self.cuda:
            torch.cuda.synchronize()
            return [start.elapsed_time(end) / 1000 if start is not None and end is not None else 0.0
                    for start, end in self._events]
        return list(self._times)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@dataclass
class Cell:
    method: str
    keep_ratio: float
    visual_tokens: int
    kept_tokens: int
    prune_layer: int | None  # single-stage K (None: pre-LLM or multi-stage)
    llm_prefill_s: dict[str, float]  # min / median (extrapolated to full depth with --layers)
    vision_s: float  # vision tower + projector in the fastest TTFT run (full tower; nan without e2e)
    ttft_s: dict[str, float]  # min / median (full depth: the missing layers' and blocks' time added)
    decode_per_token_s: float
    select_s: float
    flops: float
    flops_unpruned: float
    kv_bytes: int
    peak_mem_bytes: int
    vision_flops: float = 0.0  # the full vision tower + projector (lmms_prune.efficiency encoder formula)
    ttft_parts: dict[str, float] = field(default_factory=dict)  # timing.PHASES of the fastest TTFT run; sum = TTFT
    speedup: float = 0.0  # LLM prefill, measured
    theoretical_speedup: float = 0.0  # LLM prefill FLOPs ratio
    measured_over_theoretical: float = 0.0
    ttft_speedup: float = 0.0  # time to first token, measured (nan without e2e)
    e2e_theoretical_speedup: float = 0.0  # (vision + prefill FLOPs) ratio: what pruning in the LLM buys at most
    select_over_unpruned_prefill: float = 0.0
    eager_reference: dict[str, float] = field(default_factory=dict)
    prune_layers: list[int] | None = None  # multi-stage: the stage layers K_1 < K_2 < ...
    visual_per_layer: float = 0.0  # mean visual tokens per full-depth decoder layer (the FLOPs-matched budget)


def _stats(xs: Sequence[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs)}



def check_plan(methods: Sequence[str], keep_ratios: Sequence[float], token_counts: Sequence[int],
               extra: dict[str, dict[str, Any]]) -> None:
    """Check every cell a bench will time, before the model loads and the unpruned baseline is timed (minutes):
    known methods, each (method, keep ratio, ``extra`` parameters) a valid config
    (`lmms_prune.presets.resolve_config`), every ``bias_prior`` readable, token counts >= 1."""
    from lmms_prune.engine.prior import load_prior
    from lmms_prune.presets import PRESETS, resolve_config

    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        raise ValueError(f"--methods {','.join(unknown)}: unknown; choose from {', '.join(PRESETS)}")
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise ValueError(f"--method-args {extra!r}: give a JSON object of objects, e.g. "
                         '\'{"d2pruner": {"bias_prior": "p.pt"}}\'')
    if not keep_ratios or not token_counts:
        raise ValueError("--keep and --tokens need at least one value each")
    for n in token_counts:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"--tokens {n!r}: visual-token counts must be integers >= 1")
    for method in methods:
        if method == "none":
            continue
        for ratio in keep_ratios:
            try:
                # the cell's own parameters (Bench._params: --method-args may override the keep ratio)
                config = resolve_config(method, **{"keep_ratio": ratio, **extra.get(method, {})})
            except ValueError as err:
                raise ValueError(f"--methods {method} --keep {ratio:g}: {err}") from None
        if config.stage != "none" and config.needs().prior and config.bias_prior:
            load_prior(config.bias_prior)

class Bench:
    """Runs the grid on one model. ``full_depth`` is the real depth when a truncated stack runs; a model from
    :func:`build_geometry` with ``vision_layers`` states its full tower in ``bench_full_config``."""

    def __init__(self, model: nn.Module, full_depth: int | None = None, repeats: int = 3, warmup: int = 1,
                 decode_tokens: int = 8, e2e: bool = True, eager_reference: bool = False,
                 progress: Callable[[str], None] = print):
        self.model = model
        self.adapter = get_adapter(model)
        self.depth = self.adapter.num_layers
        self.full_depth = full_depth or self.depth
        self.dims = DecoderDims.from_config(self.adapter.text_config, ffn_matrices=3)
        self.full_dims = DecoderDims(**{**asdict(self.dims), "num_layers": self.full_depth})
        family = type(self.adapter)
        self.full_config = getattr(model, "bench_full_config", model.config)
        self.vision_depth = family.vision_depth(model.config)
        self.full_vision_depth = family.vision_depth(self.full_config)
        self.repeats, self.warmup, self.decode_tokens = repeats, warmup, decode_tokens
        self.e2e, self.eager_reference = e2e, eager_reference
        self.device = next(model.parameters()).device
        self.bytes = torch.finfo(next(model.parameters()).dtype).bits // 8
        self.progress = progress

    def _params(self, method: str, keep_ratio: float, extra: dict[str, Any]) -> dict[str, Any]:
        return {"keep_ratio": 1.0} if method == "none" else {"keep_ratio": keep_ratio, **extra}

    def _prefill_runs(self, memory: PeakRSS) -> Iterator[tuple[bool, AbstractContextManager[Any]]]:
        """The prefill calls of a cell, as ``(timed, context to run the call in)``: the warm-ups, then the timed
        runs, each measured by ``memory`` (the figure is the last timed run's). Where ``memory`` needs a sampler
        thread, which would share the cores with a timed run, it measures one more, untimed, call instead."""
        runs = self.warmup + self.repeats
        for i in range(runs + memory.sampler):
            timed = self.warmup <= i < runs
            yield timed, memory if (i == runs) == memory.sampler else nullcontext()

    def _extrapolate(self, layer_times: list[float], total: float, counts: list[int]) -> float:
        """Full-depth LLM prefill time from the truncated stack's per-layer times and token ``counts`` (one per
        layer run): each full-depth layer (:meth:`_full_depth_counts`) takes the mean time of the stack's layers
        that process the same number of tokens."""
        if self.full_depth == self.depth:
            return total
        by_count: dict[int, list[float]] = {}
        for t, c in zip(layer_times, counts):
            by_count.setdefault(int(c), []).append(t)
        outside = total - sum(layer_times)
        return outside + sum(statistics.mean(by_count[c]) for c in self._full_depth_counts(counts))

    def _missing_vision(self, block_times: list[float]) -> float:
        """Time of the vision blocks a cut tower lacks: each takes the mean time of the blocks run."""
        return statistics.mean(block_times) * (self.full_vision_depth - self.vision_depth)

    def _encoded(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Inputs with the images pre-encoded, so the forward's time is the LLM's (plus embedding)."""
        video = inputs.get("pixel_values_videos") is not None
        with torch.no_grad():
            enc = self.adapter.encode_videos(inputs) if video else self.adapter.encode_images(inputs)
        out = {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_values_videos")}
        out["mm_encoder_outputs"] = {"video" if video else "image": enc}
        return out

    def _generate_timings(self, handle: Any, inputs: dict[str, Any], pre_llm: bool,
                          llm_missing: float) -> tuple[list[dict[str, float]], list[float]]:
        """Per timed ``generate`` from pixels: the TTFT's phases (:func:`lmms_prune.timing.ttft_parts`, the
        missing decoder layers' ``llm_missing`` seconds and the missing vision blocks' time added), and the
        decode time per token."""
        clock = PhaseClock(self.model, self.adapter, self.device)
        blocks = LayerTimer(self.adapter.vision_layers(), self.device) \
            if self.full_vision_depth != self.vision_depth else None
        runs, decode = [], []
        try:
            for i in range(self.warmup + self.repeats):
                steps = StepClock()
                clock.start()
                self.model.generate(**inputs, max_new_tokens=1 + self.decode_tokens,
                                    min_new_tokens=1 + self.decode_tokens, do_sample=False, stopping_criteria=[steps])
                if i < self.warmup:
                    continue
                parts = ttft_parts(clock.marks, steps.times[0], handle.records[0].select_seconds, pre_llm)
                parts["llm"] += llm_missing
                if blocks is not None:
                    parts["vision"] += self._missing_vision(blocks.times)
                runs.append(parts)
                decode.append((steps.times[-1] - steps.times[0]) / max(1, len(steps.times) - 1))
        finally:
            clock.remove()
            if blocks is not None:
                blocks.remove()
        return runs, decode

    def run_cell(self, method: str, keep_ratio: float, inputs: dict[str, Any], extra: dict[str, Any]) -> Cell:
        model, dev = self.model, self.device
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        params = self._params(method, keep_ratio, extra)
        with torch.no_grad(), apply(model, method, **params) as handle:
            if handle.config.multi_stage and self.full_depth != self.depth and params.get(
                    "prune_layers", "auto") == "auto":
                raise ValueError(f"method {method!r}: prune_layers='auto' would scale to the {self.depth} layers "
                                 f"run, not the model's {self.full_depth}; give prune_layers inside the stack in "
                                 "--method-args (the stack's layers stand for the model's first ones)")
            pre_llm = handle.config.stage == "pre_llm"
            llm_inputs = inputs if pre_llm else self._encoded(inputs)
            timer = LayerTimer(self.adapter.layers, dev)
            prefill, selects, missing = [], [], []
            mem = PeakRSS(dev)
            for timed, context in self._prefill_runs(mem):
                with context:
                    model(**llm_inputs, use_cache=True)
                if timed:
                    rec = handle.records[0]
                    full = self._extrapolate(timer.times, rec.llm_prefill_seconds, rec.kv_lengths)
                    prefill.append(full)
                    missing.append(full - rec.llm_prefill_seconds)
                    selects.append(rec.select_seconds)
            timer.remove()
            kv_lengths = rec.kv_lengths
            nan = float("nan")
            ttft, decode, vision, parts = {"min": nan, "median": nan}, nan, nan, {}
            if self.e2e:
                runs, steps = self._generate_timings(handle, inputs, pre_llm, statistics.median(missing))
                totals = [sum(r.values()) for r in runs]
                parts = runs[totals.index(min(totals))]
                ttft, decode, vision = _stats(totals), min(steps), parts["vision"]
        full_counts = self._full_depth_counts(kv_lengths)
        config = handle.config
        per_layer = statistics.mean(full_counts) - (rec.seq_len_before - rec.visual_before)
        # keep as run; measured where the budget was not a keep_ratio (stage_ratio, keep_tokens) or where the
        # method never reads it (DyCoke: its K and the frame count set the count)
        selector = SELECTORS.get(config.selector)
        reads_budget = selector is None or selector.reads_budget
        budget = config.keep_ratio if config.keep_ratio is not None and reads_budget else (
            (per_layer if config.multi_stage else rec.visual_after) / rec.visual_before)
        cell = Cell(
            method=method, keep_ratio=1.0 if method == "none" else float(budget), visual_tokens=rec.visual_before,
            kept_tokens=rec.visual_after, prune_layer=config.prune_layer,
            prune_layers=list(handle.stage_layers) if config.multi_stage else None, visual_per_layer=per_layer,
            llm_prefill_s=_stats(prefill), vision_s=vision, ttft_s=ttft, ttft_parts=parts,
            decode_per_token_s=decode, select_s=min(selects),
            flops=float(prefill_flops(self.full_dims, full_counts)),
            flops_unpruned=float(prefill_flops(self.full_dims, [rec.seq_len_before] * self.full_depth)),
            vision_flops=float(type(self.adapter).vision_flops(self.full_config, inputs)),
            kv_bytes=kv_cache_bytes(self.full_dims, full_counts, self.bytes), peak_mem_bytes=mem.peak,
        )
        if self.eager_reference and handle.config.score not in ("none", "vision") and not pre_llm:
            cell.eager_reference = self._eager(method, params, inputs)
        return cell

    def _full_depth_counts(self, kv_lengths: list[int]) -> list[int]:
        """Tokens per full-depth layer: the stack's own counts, then its last layer's count (any number of
        stages, as long as they lie inside the stack)."""
        counts = [int(c) for c in kv_lengths]
        return counts + counts[-1:] * (self.full_depth - len(counts))

    def _eager(self, method: str, params: dict[str, Any], inputs: dict[str, Any]) -> dict[str, float]:
        """The reference implementations' scoring path: eager attention in every layer, all maps returned."""
        model = self.model
        model.set_attn_implementation("eager")
        try:
            llm_inputs = self._encoded(inputs)
            with torch.no_grad(), apply(model, method, **params) as handle:
                times = []
                mem = PeakRSS(self.device)
                for timed, context in self._prefill_runs(mem):
                    with context:
                        model(**llm_inputs, use_cache=True, output_attentions=True)
                    if timed:
                        times.append(handle.records[0].llm_prefill_seconds)
        finally:
            model.set_attn_implementation("sdpa")
        return {"llm_prefill_s": min(times), "peak_mem_bytes": mem.peak}

    def run(self, methods: Sequence[str], keep_ratios: Sequence[float], token_counts: Sequence[int],
            extra: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
        extra = extra or {}
        check_plan(methods, keep_ratios, token_counts, extra)
        cells: list[Cell] = []
        for n in token_counts:
            inputs = synthetic_inputs(self.model, n)
            base = self.run_cell("none", 1.0, inputs, {})
            self.progress(f"tokens={n} none: LLM prefill {base.llm_prefill_s['min']:.3f}s, "
                          f"TTFT {base.ttft_s['min']:.3f}s")
            cells.append(base)
            for method in methods:
                if method == "none":
                    continue
                for ratio in keep_ratios:
                    cell = self.run_cell(method, ratio, inputs, extra.get(method, {}))
                    speedups(cell, base)
                    cells.append(cell)
                    self.progress(f"tokens={n} {method}@{cell.keep_ratio:g}: prefill x{cell.speedup:.2f} measured, "
                                  f"x{cell.theoretical_speedup:.2f} theoretical; TTFT x{cell.ttft_speedup:.2f} "
                                  f"measured, x{cell.e2e_theoretical_speedup:.2f} theoretical end to end")
            speedups(base, base)
        return cells


def speedups(cell: Cell, base: Cell) -> None:
    """Fill ``cell``'s ratios against the unpruned ``base`` of the same input: LLM prefill (measured, FLOPs),
    TTFT (measured) and the whole request's FLOPs (vision + prefill)."""
    cell.speedup = base.llm_prefill_s["min"] / cell.llm_prefill_s["min"]
    cell.theoretical_speedup = cell.flops_unpruned / cell.flops
    cell.measured_over_theoretical = cell.speedup / cell.theoretical_speedup
    cell.ttft_speedup = base.ttft_s["min"] / cell.ttft_s["min"]
    cell.e2e_theoretical_speedup = end_to_end_ratio(cell.vision_flops, cell.flops_unpruned, cell.flops)
    cell.select_over_unpruned_prefill = cell.select_s / base.llm_prefill_s["min"]


def _layers_text(cell: Cell) -> str:
    """The K column: the single pruning layer, the stage layers of a multi-stage method, blank pre-LLM."""
    if cell.prune_layers:
        return ",".join(map(str, cell.prune_layers))
    return "" if cell.prune_layer is None else str(cell.prune_layer)


def markdown_table(cells: Sequence[Cell], extrapolated: bool) -> str:
    head = ("| method | keep | visual tokens | kept | avg/layer | K | LLM prefill s (min/med) | prefill speed-up | "
            "prefill theory | measured/theory | TTFT s (min/med) | TTFT speed-up | e2e theory | vision s | "
            "hand-over ms | select ms | select/prefill | decode ms/tok | KV MiB | peak +MiB | "
            "eager-scoring prefill s | eager peak MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        eager = c.eager_reference
        lines.append(
            f"| {c.method} | {c.keep_ratio:g} | {c.visual_tokens} | {c.kept_tokens} | {c.visual_per_layer:.0f} | "
            f"{_layers_text(c)} | "
            f"{c.llm_prefill_s['min']:.3f} / {c.llm_prefill_s['median']:.3f} | {c.speedup:.2f} | "
            f"{c.theoretical_speedup:.2f} | {c.measured_over_theoretical:.2f} | "
            f"{c.ttft_s['min']:.3f} / {c.ttft_s['median']:.3f} | {c.ttft_speedup:.2f} | "
            f"{c.e2e_theoretical_speedup:.2f} | {c.vision_s:.3f} | "
            f"{1000 * c.ttft_parts.get('handover', float('nan')):.1f} | {1000 * c.select_s:.2f} | "
            f"{100 * c.select_over_unpruned_prefill:.2f}% | "
            f"{1000 * c.decode_per_token_s:.1f} | {c.kv_bytes / 2**20:.1f} | {c.peak_mem_bytes / 2**20:.0f} | "
            f"{eager.get('llm_prefill_s', float('nan')):.3f} | "
            f"{eager.get('peak_mem_bytes', float('nan')) / 2**20:.0f} |"
        )
    lines.append("")
    lines.append("prefill speed-up: the LLM prefill alone (vision excluded); TTFT speed-up: the whole request "
                 "(vision tower, hand-over, selection, prefill, first token), as a user waits for it. Theories are "
                 "FLOPs ratios: prefill theory of the decoder, e2e theory of vision tower + decoder.")
    if extrapolated:
        lines.append("")
        lines.append("LLM prefill times, FLOPs and KV bytes are extrapolated to the full depth from a truncated "
                     "stack (per-layer times), and so are the TTFT and vision times (the missing layers' and "
                     "vision blocks' times added); decode times are those of the truncated model.")
    return "\n".join(lines)


def plot(cells: Sequence[Cell], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    methods = sorted({c.method for c in cells if c.method != "none"})
    for m in methods:
        pts = sorted((c.kept_tokens, c.speedup, c.theoretical_speedup, c.kv_bytes) for c in cells if c.method == m)
        xs = [p[0] for p in pts]
        line, = ax1.plot(xs, [p[1] for p in pts], marker="o", label=f"{m} prefill measured")
        ax1.plot(xs, [p[2] for p in pts], linestyle="--", marker="x", color=line.get_color(), label=f"{m} theory")
        e2e = sorted((c.kept_tokens, c.ttft_speedup, c.e2e_theoretical_speedup) for c in cells if c.method == m)
        ax1.plot(xs, [p[1] for p in e2e], marker="s", linestyle="-.", color=line.get_color(), label=f"{m} TTFT")
        ax1.plot(xs, [p[2] for p in e2e], linestyle=":", marker="+", color=line.get_color(), label=f"{m} e2e theory")
        ax2.plot(xs, [p[3] / 2**20 for p in pts], marker="o", label=m)
    base = [c for c in cells if c.method == "none"]
    if base:
        ax2.axhline(base[0].kv_bytes / 2**20, color="gray", linestyle=":", label="unpruned")
    ax1.set(xlabel="kept visual tokens", ylabel="speed-up (x)", title="Prefill and TTFT speed-up vs kept tokens")
    ax2.set(xlabel="kept visual tokens", ylabel="KV cache (MiB)", title="KV-cache size vs kept tokens")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(cells: Sequence[Cell], out_dir: Path, meta: dict[str, Any], extrapolated: bool) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "cells": [asdict(c) for c in cells]}
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "plot": out_dir / "bench.png"}
    paths["json"].write_text(json.dumps(data, indent=2))
    paths["markdown"].write_text(markdown_table(cells, extrapolated) + "\n")
    plot(cells, paths["plot"])
    return paths
