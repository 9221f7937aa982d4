"""GAP's position rule (arXiv 2506.21873) as ``positions='gap'``: the pure rule, a re-creation of the paper's
arithmetic, and the engine's use of it inside the LLM (prune == mask at the same positions, and the positions
each later layer receives) and before it (identical to ``positions='original'``)."""

from __future__ import annotations

import pytest
import torch
from test_engine import _one

import lmms_prune
from lmms_prune import selection as sel
from lmms_prune.presets import resolve_config

torch.set_num_threads(1)


def _paper_gap(position_ids: list[int], keep: list[bool]) -> list[int]:
    """The paper's rule, written from its text: walk the unpruned sequence; a token that stays keeps the ID it
    had there, a token that goes leaves its ID unused (no renumbering)."""
    return [pid for pid, stay in zip(position_ids, keep) if stay]


@pytest.mark.parametrize("seed", range(5))
def test_gap_positions_keep_order_and_values_as_the_paper(seed):
    g = torch.Generator().manual_seed(seed)
    t = 40
    ids = torch.arange(t) + int(torch.randint(0, 9, (1,), generator=g))
    keep = torch.rand(t, generator=g) < 0.4
    keep[-1] = True  # the prompt's last token always stays
    out = sel.gap_positions(ids, keep)
    assert out.tolist() == _paper_gap(ids.tolist(), keep.tolist())
    assert bool((out[1:] > out[:-1]).all())  # order kept
    assert int(out[-1]) == int(ids[-1])  # the next token continues from the unpruned length
    assert torch.equal(sel.gap_positions(ids, torch.nonzero(keep).flatten()), out)  # mask and index agree
    if not bool(keep.all()):  # what GAP replaces: contiguous renumbering moves the last token's ID
        assert int(out[-1]) != int(torch.arange(keep.sum())[-1]) + int(ids[0])


def test_gap_positions_on_m_rope_take_every_axis():
    ids = torch.stack([torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 1, 1, 2, 3]),
                       torch.tensor([0, 1, 0, 1, 2, 3])])  # [3, T]: a 2x2 grid then two text tokens
    out = sel.gap_positions(ids, torch.tensor([1, 2, 4, 5]))
    assert out.tolist() == [[0, 0, 0, 0], [0, 1, 2, 3], [1, 0, 2, 3]]


@pytest.mark.parametrize(("keep", "match"), [(torch.tensor([2, 1]), "strictly increasing"),
                                             (torch.tensor([1, 1]), "strictly increasing"),
                                             (torch.tensor([0, 9]), "outside"),
                                             (torch.tensor([0.0, 1.0]), "integer indices"),
                                             (torch.ones(3, dtype=torch.bool), "one per token")])
def test_gap_positions_refuse_bad_input_with_the_fix(keep, match):
    with pytest.raises(ValueError, match=match):
        sel.gap_positions(torch.arange(5), keep)


def test_positions_option_defaults_and_refusals():
    assert resolve_config("fastv").positions == "gap"  # inside the LLM the engine's rule is GAP's
    # multi-stage: the authors' per-stage renumbering by default, GAP's rule on request
    assert resolve_config("pyramiddrop").positions == "contiguous"
    assert resolve_config("pyramiddrop", positions="gap").positions == "gap"
    assert resolve_config("vispruner").positions == "contiguous"  # pre-LLM default unchanged
    assert resolve_config("vispruner", positions="gap").positions == "gap"
    with pytest.raises(ValueError, match="positions='contiguous' with single-stage pruning inside the LLM.*"
                       "use positions='gap'"):
        resolve_config("fastv", positions="contiguous")
    with pytest.raises(ValueError, match="positions='contiguous'"):
        resolve_config("visionzip", positions="gap")  # merged tokens have no original position


def _recorder(seen: dict, layer: int):
    def hook(module, args, kwargs):
        seen.setdefault(layer, dict(kwargs, hidden_states=args[0] if args else kwargs.get("hidden_states")))

    return hook


@pytest.mark.parametrize("family", ["internvl_llama", "qwen2_5_vl"])
def test_gap_in_the_llm_equals_mask_mode_and_feeds_the_gap_positions(toys, family):
    """fastv with positions='gap' pruned equals mask mode (full length at the original positions), and layer K
    receives ``gap_positions`` of the full sequence's IDs, with RoPE tables computed at exactly those IDs."""
    model, proc = toys(family)
    inputs = _one(family, proc)
    lm = model.model.language_model
    k = 2
    with torch.no_grad():
        with lmms_prune.apply(model, "fastv", keep_ratio=0.25, prune_layer=k, positions="gap", mode="mask"):
            mask_logits = model(**inputs).logits
        seen: dict[int, dict] = {}
        with lmms_prune.apply(model, "fastv", keep_ratio=0.25, prune_layer=k, positions="gap") as handle:
            hooks = [lm.layers[i].register_forward_pre_hook(_recorder(seen, i), with_kwargs=True) for i in (0, k)]
            hooks.append(lm.register_forward_pre_hook(_recorder(seen, -1), with_kwargs=True))
            logits = model(**inputs).logits
            for h in hooks:
                h.remove()
            keep = handle.state.keep_index[0]
        torch.testing.assert_close(logits[:, -1], mask_logits[:, -1], atol=1e-5, rtol=0)
        full = seen[0]["position_ids"]
        if full is None:  # Qwen's layers get RoPE tables only; its M-RoPE IDs [3, B, T] are the LM's input
            full = seen[-1]["position_ids"][-3:]
        else:
            assert torch.equal(seen[k]["position_ids"][..., 0, :], sel.gap_positions(full[..., 0, :], keep))
        expected = sel.gap_positions(full[..., 0, :], keep)
        cos, sin = lm.rotary_emb(seen[k]["hidden_states"], expected.unsqueeze(-2))
        torch.testing.assert_close(seen[k]["position_embeddings"][0], cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(seen[k]["position_embeddings"][1], sin, atol=1e-6, rtol=0)


def test_gap_before_the_llm_is_the_original_positions_rule(toys):
    model, proc = toys("qwen2_5_vl")
    inputs = _one("qwen2_5_vl", proc)
    with torch.no_grad():
        out = {}
        for rule in ("gap", "original", "contiguous"):
            with lmms_prune.apply(model, "vispruner", keep_ratio=0.2, positions=rule):
                out[rule] = model(**inputs).logits[:, -1]
    assert torch.equal(out["gap"], out["original"])
    assert not torch.allclose(out["gap"], out["contiguous"])  # the rule matters on this input
