"""``backend=vllm``: the harness-neutral runner (:class:`lmms_prune.runner.Runner`) answering through vLLM with the
plug-in (:mod:`lmms_prune.vllm`) instead of transformers' ``generate`` with our engine.

The same lmms-eval models (``--model qwen2_5_vl_divprune``, ``llava_visionzip``, ...) run it with ``backend=vllm``
in their model arguments, from the vLLM venv (``scripts/vllm_env.sh``); VLMEvalKit's models build the same runner
from the same option (not run through VLMEvalKit yet). Prompts are built as
the transformers backend builds them (the checkpoint's chat template, the family's image pipeline, the task's
protocol settings), so both backends hand their engines the same text and the same pixels; the pruning config
reaches vLLM as ``hf_overrides["lmms_prune"]`` (plus the M-RoPE declaration a 1-D RoPE family needs for
``positions=original``: :func:`lmms_prune.vllm.served_overrides`), checked before anything loads
(:func:`lmms_prune.vllm.backend_options`).

Efficiency records carry the same fields as the transformers backend's where vLLM gives them: the visual tokens
before (the transformers processor's count for the same prompt, structural tokens such as LLaVA-NeXT's row
newlines left out as both engines leave them out of the budget) and after (the placeholder runs vLLM scheduled),
the prompt lengths (vLLM's ``prompt_token_ids``, checked against ``before - visual_before + visual_after``), the
theoretical prefill FLOPs and KV cache of :mod:`lmms_prune.efficiency`, the time to first token where vLLM's
request metrics have it, and the batch's wall time. The per-phase times (vision, hand-over, LLM prefill,
selection) happen inside vLLM's worker and are not recorded.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lmms_prune import selection as sel
from lmms_prune.efficiency import DecoderDims
from lmms_prune.runner import Answer, Runner, apply_until, generation_kwargs, protocol_options, torch_dtype
from lmms_prune.vllm import served_overrides


class VllmRunner(Runner):
    """A pruned VLM served by vLLM with the plug-in; same steps and answers as :class:`~lmms_prune.runner.Runner`."""

    def setup_device(self, device: torch.device | None = None) -> None:
        if device is not None:
            raise ValueError("backend=vllm runs in one process (vLLM starts its own workers; tensor_parallel_size "
                             "in vllm_engine_args spreads a model over GPUs): launch without accelerate's "
                             "multi-process mode (--num_processes 1)")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.options.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = torch_dtype(self.options.dtype)
        self.attn = "vllm"

    def load(self) -> None:
        """Check the checkpoint as the transformers backend does, then start vLLM with the plug-in's key."""
        from vllm import LLM

        opts = self.options
        self.hf_config = self.check_checkpoint()
        engine = {"disable_log_stats": False, "seed": 0, **opts.vllm_engine_args}  # stats: the TTFT per request
        overrides = served_overrides(opts.family, opts.vllm_prune, self.hf_config)
        processor_kwargs = self.family.processor_kwargs(opts.family)
        self.model = LLM(model=opts.pretrained, revision=opts.revision, trust_remote_code=opts.trust_remote_code,
                         dtype=str(self.dtype).replace("torch.", ""), hf_overrides=overrides,
                         mm_processor_kwargs=processor_kwargs or None, max_num_seqs=opts.batch_size, **engine)
        self.load_processor()

    def install(self) -> None:
        text = getattr(self.hf_config, "text_config", None) or self.hf_config
        self.dims = DecoderDims.from_config(text)
        self.bytes_per_element = torch.empty((), dtype=self.dtype).element_size()
        self.handle = None  # no engine patch: the plug-in prunes inside vLLM
        self._hooks = []

    def close(self) -> None:
        self.model = None

    def report(self) -> dict[str, Any]:
        return {**super().report(), "model_type": self.hf_config.model_type,
                "vllm_engine_args": dict(self.options.vllm_engine_args)}

    def loglikelihood(self, images, context, continuation, task_kind, task=""):
        raise NotImplementedError(f"{self.model_id}: backend=vllm answers generation requests only (vLLM scores "
                                  "prompt tokens through prompt_logprobs, which the plug-in's pruned prompts have "
                                  "not been proven on); run loglikelihood tasks with backend=transformers")

    def visual_counts(self, inputs: Any, n_images: int) -> list[int]:
        """Visual tokens per image of one prompt's processor output: Qwen's ``image_grid_thw`` merged units;
        elsewhere the runs of the image token (InternVL: ``<img>`` ... ``</img>`` around each image's tiles), or,
        where images touch (LLaVA's adjacent ``<image>`` runs), the count split evenly (LLaVA-1.5: 576 each)."""
        from lmms_prune.families.base import runs

        grid = inputs.get("image_grid_thw")
        if grid is not None:
            merge = int(getattr(self.hf_config.vision_config, "spatial_merge_size", 2)) ** 2
            return [int(t * h * w) // merge for t, h, w in grid.tolist()]
        token = getattr(self.hf_config, "image_token_index", None) or self.hf_config.image_token_id
        spans = [length for _, length in runs(inputs["input_ids"][0] == token)]
        if len(spans) == n_images:
            return spans
        total = sum(spans)
        return [total // n_images] * n_images if n_images else []

    def generate(self, conversations: list[list[dict[str, Any]]], gen_kwargs: dict[str, Any],
                 task_kind: str | None, task: str = "") -> list[Answer]:
        """Answer a batch of conversations with one ``LLM.generate`` call (vLLM schedules them together)."""
        from vllm import SamplingParams

        t_start = time.perf_counter()
        family_options = self.options.family
        if self.options.task_protocol:
            family_options = protocol_options(self.family, family_options, gen_kwargs, task)
        processor_kwargs = self.family.processor_kwargs(family_options)
        requests, expected = [], []
        vision_flops = 0  # the batch's vision-tower FLOPs, as the transformers backend's records carry them
        for messages in conversations:
            plain, images, videos = self.split_visuals(messages)
            if videos:
                raise ValueError("backend=vllm: videos are not pruned by the vLLM plug-in yet; use "
                                 "backend=transformers for video tasks")
            text = self.build_prompt(plain, family_options)
            sizes = [image.size for image in images]
            images = self.family.prepare_images(images, family_options, processor=self.processor)
            inputs = self.processor(text=[text], images=images or None, return_tensors="pt", **processor_kwargs)
            runs = self.visual_counts(inputs, len(images))
            # structural tokens (LLaVA-NeXT's row newlines) are kept outside the budget, as by both engines
            structure = self.family.image_structure(self.processor, inputs) if images else None
            structure = structure or [(0, None)] * len(runs)
            before = [n - s for n, (s, _) in zip(runs, structure)]
            papers = [p or n for n, (_, p) in zip(before, structure)]
            after = [n if self.options.vllm_prune is None else
                     sel.budget(n, keep_ratio=self.config.keep_ratio, keep_tokens=self.config.keep_tokens)
                     for n in before]
            frames = [self.family.box_frame(size, inputs, i, family_options, self.processor)
                      for i, size in enumerate(sizes)]
            request: dict[str, Any] = {"prompt": text}
            if images:
                request["multi_modal_data"] = {"image": images}
            if processor_kwargs:
                request["mm_processor_kwargs"] = processor_kwargs
            requests.append(request)
            expected.append((int(inputs["input_ids"].shape[1]), before, after, frames, papers))
            vision_flops += self.family.vision_flops(self.hf_config, inputs)
        gen, until = generation_kwargs(gen_kwargs, int(family_options.get("default_max_new_tokens", 128)))
        if gen["num_beams"] != 1:
            raise ValueError(f"num_beams={gen['num_beams']} with backend=vllm: vLLM's beam search is a separate "
                             "API the plug-in has not been proven on; use backend=transformers")
        if not self.options.use_until:
            until = []
        sampling = SamplingParams(max_tokens=gen["max_new_tokens"], temperature=gen.get("temperature") or 0.0,
                                  top_p=gen.get("top_p") or 1.0, top_k=gen.get("top_k") or 0,
                                  stop=[u for u in until if u] or None, seed=0)
        t_gen = time.perf_counter()
        results = self.model.generate(requests, sampling, use_tqdm=False)
        t_gen_end = time.perf_counter()
        out = []
        for (seq_before, before, after, frames, papers), result in zip(expected, results):
            seq_after = len(result.prompt_token_ids)
            if seq_after != seq_before - sum(before) + sum(after):
                raise RuntimeError(f"vLLM scheduled {seq_after} prompt tokens where the transformers processor's "
                                   f"{seq_before} less {sum(before)} visual plus their budget {sum(after)} gives "
                                   f"{seq_before - sum(before) + sum(after)}: the two engines' prompts differ")
            completion = result.outputs[0]
            n_out = len(completion.token_ids)
            record = self.served_record(result, len(conversations), seq_before, seq_after, before, after, n_out,
                                        t_start, t_gen, t_gen_end, papers)
            record["task_kind"] = task_kind
            record["batch_vision_flops"] = vision_flops
            out.append(Answer(apply_until(completion.text, until), seq_after, n_out, record, frames))
        return out

    def served_record(self, result: Any, batch: int, seq_before: int, seq_after: int, before: list[int],
                      after: list[int], n_out: int, t_start: float, t_gen: float, t_gen_end: float,
                      papers: list[int]) -> dict[str, Any]:
        """One sample's efficiency record (the transformers backend's fields that vLLM gives)."""
        layers = [seq_after] * self.dims.num_layers
        full = [seq_before] * self.dims.num_layers
        metrics = getattr(result, "metrics", None)
        first = float(getattr(metrics, "first_token_latency", 0.0) or 0.0)
        t_end = time.perf_counter()
        return {
            "batch_size": batch,
            "backend": "vllm",
            "visual_before": sum(before),
            "visual_before_papers": sum(papers),
            "visual_after": sum(after),
            "visual_after_per_image": list(after),
            "tokens_per_layer": layers,
            "seq_len_before": seq_before,
            "seq_len_after": seq_after,
            "preprocess_seconds": t_gen - t_start,
            # vLLM's own first-token latency (from the request's arrival in the engine); None without stats
            **({"ttft_seconds": (t_gen - t_start) + first} if first > 0 else {}),
            "generate_seconds": t_gen_end - t_gen,
            "end_to_end_seconds": t_end - t_start,
            **self.cost_fields(layers, full),
            "output_tokens": n_out,
        }
