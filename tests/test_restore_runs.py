"""``selection.restore_runs``: the unpruned prompt of a prompt whose visual runs were cut to their kept tokens
(the vLLM plug-in's ``positions='original'``, which only sees the pruned prompt). Proven against our engine's own
arithmetic: restoring and gathering gives exactly the positions our engine hands the LLM."""

from __future__ import annotations

import random

import pytest
import torch

from lmms_prune import selection as sel


def _cut(tokens: list[int], runs: list[tuple[int, int]], rng: random.Random):
    """A pruned prompt of ``tokens`` (each visual run ``(offset, size)`` cut to a random ascending subset) with
    the ``restore_runs`` arguments and the mask of what it kept."""
    out, args, keep, at = [], [], [True] * len(tokens), 0
    for offset, size in runs:
        kept = sorted(rng.sample(range(size), rng.randint(1, size)))
        out += tokens[at:offset]
        args.append((len(out), len(kept), size, kept))
        out += [tokens[offset + i] for i in kept]
        for i in range(size):
            keep[offset + i] = i in kept
        at = offset + size
    out += tokens[at:]
    return out, args, torch.tensor(keep)


@pytest.mark.parametrize("seed", range(25))
def test_restoring_a_cut_prompt_gives_back_the_prompt_and_the_kept_mask(seed):
    """Property: for random prompts with random runs and random kept subsets (single tokens and full runs included), the
    restored prompt is the original one (runs hold one placeholder token), its run offsets are the original
    ones, and the mask is the one the cut kept; gathering the unpruned positions with it equals gathering them at
    the kept indices (GAP's rule)."""
    rng = random.Random(seed)
    text = [rng.randint(10, 99) for _ in range(rng.randint(0, 12))]
    tokens, runs = list(text), []
    for _ in range(rng.randint(0, 3)):
        size = rng.randint(1, 9)
        where = rng.randint(0, len(tokens))
        if any(o <= where < o + s for o, s in runs) or any(where < o for o, _ in runs):
            where = len(tokens)
        runs.append((where, size))
        tokens[where:where] = [7] * size
    pruned, args, keep = _cut(tokens, runs, rng)
    restored, offsets, mask = sel.restore_runs(pruned, args)
    assert restored == tokens
    assert offsets == [o for o, _ in runs]
    assert torch.equal(mask, keep) and int(mask.sum()) == len(pruned)
    positions = torch.stack([torch.arange(len(tokens)), torch.arange(len(tokens)) * 2, torch.arange(len(tokens)) % 5])
    assert torch.equal(sel.gap_positions(positions, mask), positions[:, torch.nonzero(keep).flatten()])


def test_restore_runs_on_qwen_prompt_equals_our_engines_original_positions(toys):
    """On the Qwen2.5-VL toy: cut the prompt to the tokens our engine keeps with positions='original', restore it,
    and the unpruned M-RoPE positions (transformers' get_rope_index) gathered with the mask are the position ids our
    engine hands the LLM."""
    import lmms_prune
    from lmms_prune import conformance

    model, proc = toys("qwen2_5_vl")
    inputs = conformance.image_inputs("qwen2_5_vl", proc, [[conformance.photo((300, 200))]],
                                      ["Where is the cup on the table?"], torch.device("cpu"), torch.float32)
    ids = inputs["input_ids"][0].tolist()
    captured = {}
    lm = model.model.language_model

    def grab(module, args, kwargs):
        captured.setdefault("pos", kwargs.get("position_ids"))

    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), lmms_prune.apply(model, "divprune", keep_ratio=0.25, positions="original") as handle:
            model(**inputs)
    finally:
        hook.remove()
    record = handle.records[0]
    [span] = record.spans
    kept = record.kept[0].tolist()
    pruned = ids[:span.start] + [ids[span.start + i] for i in kept] + ids[span.start + span.length:]
    restored, offsets, mask = sel.restore_runs(pruned, [(span.start, len(kept), span.length, kept)])
    assert restored == ids and offsets == [span.start]
    full, _ = model.model.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                         attention_mask=inputs["attention_mask"],
                                         mm_token_type_ids=inputs.get("mm_token_type_ids"))
    engine = captured["pos"]
    assert torch.equal(sel.gap_positions(full[:, 0], mask), engine[-3:, 0])


@pytest.mark.parametrize("runs, message", [
    ([(3, 2, 4, [0, 1]), (1, 1, 2, [0])], "runs must ascend"),
    ([(0, 2, 4, [1, 1])], "ascending indices"),
    ([(0, 2, 4, [0, 4])], r"in \[0, 4\)"),
    ([(0, 1, 4, [0, 1])], "must be 1 ascending"),
    ([(5, 2, 4, [0, 1])], "inside the 6 tokens"),
    ([(2, 0, 4, [])], "keeps no token"),
])
def test_restore_runs_names_a_bad_run(runs, message):
    with pytest.raises(ValueError, match=message):
        sel.restore_runs([1, 2, 3, 4, 5, 6], runs)
