"""FastVID's ATS attention on Qwen (``fastvid_attention``, the engine's ``Needs.vision_frame_attention``).

* ``authors_frame_attention`` re-creates the signal of their Qwen2.5-VL port (LunarShen/FastVID at
  a40a109cb8df20e8c2c17c6850f8269717369990, ``fastvid_qwen25vl/.../qwenvlutils/modeling_qwen2_5_vl.py``),
  written from reading it: in the tower's last block (``layer_num == self.depth - 1``, lines 581-584), on the
  queries and keys after the vision RoPE (``apply_rotary_pos_emb_vision``, line 195) in the tower's window order,
  per head: each merged frame's mean query over all its patches (line 199), each 2 x 2 merge unit's mean key
  (line 200), ``softmax(q k^T / sqrt(head_dim))`` over the frame's units (lines 201-202), then the mean over
  heads (line 203); the window permutation undone after the merger (``attn_weights[reverse_indices]``, lines
  591-594). Theirs runs one video (``grid_thw[0]``); ours runs each image or video of the call.
* ours (the family's ``frame_query_attention`` on the per-call unit means the engine captures) equals it on random
  queries and keys with Qwen2.5-VL's real layout (windows that permute the units, several merged frames, two
  videos), whether the block is called per window, per frame or once (flash attention); each frame's values sum
  to 1; the window order does not change a token's value (Qwen2-VL's unpermuted tower gives the same);
* end to end on tiny Qwen2.5-VL (windows) and Qwen2-VL: the attention FastVID ranks by is the re-creation on the
  last block's own queries and keys; ``fastvid_attention='received'`` keeps the engine's mean received
  attention (re-created here as well) available; a method may read both from one encoder pass (on these
  towers the same block, whose two captures chain);
* the option resolves per variant, and ``frame_query`` on a family without it is refused from the config alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_video_engine import _video_inputs
from transformers import LlavaOnevisionConfig, Qwen2_5_VLConfig
from transformers.vision_utils import get_vision_window_index

import lmms_prune
import lmms_prune.selection as selection
from lmms_prune.families import get_adapter
from lmms_prune.methods.base import Needs
from lmms_prune.methods.fastvid import FastVID
from lmms_prune.presets import check_model, resolve_config
from lmms_prune.selection import frame_query_attention, unit_means


def authors_frame_attention(q: torch.Tensor, k: torch.Tensor, thw: tuple[int, int, int],
                            window_index: torch.Tensor) -> torch.Tensor:
    """Their port's ``[t, h w / 4]`` per-frame attention of one video from the last block's rotary-embedded
    ``q``, ``k`` ``[S, H, d]`` in the tower's window order (``window_index``: the tower's unit permutation)."""
    t, h, w = thw
    heads, dim = q.shape[1], q.shape[2]
    q_attn = q.transpose(0, 1).reshape(heads, t, h * w, dim).mean(-2, keepdim=True)
    k_attn = k.transpose(0, 1).reshape(heads, t, h * w // 4, 4, dim).mean(-2)
    weights = torch.softmax(q_attn @ k_attn.transpose(-2, -1) / math.sqrt(dim), dim=-1).mean(2).mean(0)
    return weights.reshape(-1)[torch.argsort(window_index)].reshape(t, -1)


def _windows(adapter, thw: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    """The tower's unit permutation and window bounds (in patches) for ``thw``, as Qwen2.5-VL's tower builds them."""
    vc = adapter.vision_config
    index, bounds = get_vision_window_index(torch.tensor(thw), spatial_merge_size=vc.spatial_merge_size,
                                            window_size=vc.window_size, patch_size=vc.patch_size)
    return index, torch.unique_consecutive(torch.as_tensor(bounds)).tolist()


def _ours(adapter, q: torch.Tensor, k: torch.Tensor, bounds: list[int], thw: list[list[int]]) -> torch.Tensor:
    """The family's signal from the block's calls over ``bounds`` (patches), each reduced as the engine's capture
    reduces it; ``q``, ``k`` ``[S, H, d]``."""
    calls = list(zip(bounds[:-1], bounds[1:]))
    return adapter.frame_query_attention([unit_means(q[a:b].transpose(0, 1), 4) for a, b in calls],
                                         [unit_means(k[a:b].transpose(0, 1), 4) for a, b in calls],
                                         {"image_grid_thw": torch.tensor(thw)})


def test_frame_query_attention_equals_the_recreation_of_their_port_on_windowed_layouts(toys):
    qwen25, qwen2 = get_adapter(toys("qwen2_5_vl")[0]), get_adapter(toys("qwen2_vl")[0])
    thw = [[3, 12, 10], [2, 8, 10]]  # merged 6 x 5 and 4 x 5: 4 x 4-unit windows cut both
    sizes = [t * h * w for t, h, w in thw]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(sum(sizes), 2, 8, generator=g), torch.randn(sum(sizes), 2, 8, generator=g) * 3
    window_index, window_bounds = _windows(qwen25, thw)
    assert not torch.equal(window_index, torch.arange(window_index.numel()))  # the layout permutes units
    expected = []
    for v, (lo, size) in enumerate(zip([0, sizes[0]], sizes)):
        alone, _ = _windows(qwen25, [thw[v]])
        expected.append(authors_frame_attention(q[lo:lo + size], k[lo:lo + size], tuple(thw[v]), alone).flatten())
    expected = torch.cat(expected)
    frames = [0] + torch.tensor([h * w for t, h, w in thw for _ in range(t)]).cumsum(0).tolist()
    for bounds in (window_bounds, frames, [0, sum(sizes)]):  # windowed, full-attention and flash calls
        torch.testing.assert_close(_ours(qwen25, q, k, bounds, thw), expected)
    # every merged frame's values sum to 1 (prompt order runs frame after frame)
    per_frame = torch.split(expected, [h * w // 4 for t, h, w in thw for _ in range(t)])
    torch.testing.assert_close(torch.stack([f.sum() for f in per_frame]), torch.ones(5))
    # the window order does not change a token's value: the same patches in the processor's order, unpermuted
    # (Qwen2-VL's tower), give the same signal
    raster = torch.argsort(window_index)
    unpermuted = [x.view(-1, 4, *x.shape[1:])[raster].flatten(0, 1) for x in (q, k)]
    torch.testing.assert_close(_ours(qwen2, *unpermuted, frames, thw), expected)


def test_frame_query_attention_is_a_softmax_of_the_mean_query_per_frame():
    g = torch.Generator().manual_seed(1)
    uq, uk = torch.randn(3, 2 * 6, 4, generator=g), torch.randn(3, 2 * 6, 4, generator=g)
    out = frame_query_attention(uq, uk, frames=2)
    assert out.shape == (2, 6) and bool((out > 0).all())
    torch.testing.assert_close(out.sum(1), torch.ones(2))
    # a unit permutation within a frame permutes its values the same way
    perm = torch.cat([torch.randperm(6, generator=g), 6 + torch.randperm(6, generator=g)])
    torch.testing.assert_close(frame_query_attention(uq[:, perm], uk[:, perm], frames=2).flatten(),
                               out.flatten()[perm])
    with pytest.raises(ValueError, match="multiple of frames=5"):
        frame_query_attention(uq, uk, frames=5)
    with pytest.raises(ValueError, match="merge unit 4"):
        unit_means(torch.zeros(2, 6, 4), 4)


def _last_block_qk(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The tower's last block's rotary-embedded queries and keys ``[S, H, d]`` on ``inputs``' video, recomputed
    from the block's input with its own ``qkv`` and the vision RoPE (their ``apply_rotary_pos_emb_vision``)."""
    attn = get_adapter(model).vision_layers()[-1].attn
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"],
                                                                         pos=kw["position_embeddings"]),
                                          with_kwargs=True)
    try:
        with torch.no_grad():
            get_adapter(model).encode_videos(inputs)
    finally:
        hook.remove()
    x, (cos, sin) = seen["x"], seen["pos"]
    q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()

    def rotate(v):
        half = v.shape[-1] // 2
        return v.float() * cos + torch.cat([-v[..., half:], v[..., :half]], -1).float() * sin

    return rotate(q).detach(), rotate(k).detach()


def _received(q: torch.Tensor, k: torch.Tensor, thw: list[int], window_index: torch.Tensor) -> torch.Tensor:
    """The engine's ``vision_attention`` on a full-attention last block: per frame, the attention each patch
    receives, averaged over heads and query rows, summed per merge unit, in prompt order."""
    t, h, w = thw
    dim = q.shape[-1]
    per_frame = [torch.softmax(qf.transpose(0, 1) @ kf.transpose(0, 1).transpose(-1, -2) / math.sqrt(dim), -1)
                 .mean((0, 1)) for qf, kf in zip(q.split(h * w), k.split(h * w))]
    return torch.cat(per_frame).view(-1, 4).sum(1)[torch.argsort(window_index)]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_the_attention_fastvid_ranks_by_is_their_signal_on_the_towers_last_block(toys, monkeypatch, family):
    model, proc = toys(family)
    inputs = _video_inputs(proc)
    thw = inputs["video_grid_thw"][0].tolist()
    adapter = get_adapter(model)
    window_index = (_windows(adapter, [thw])[0] if family == "qwen2_5_vl"
                    else torch.arange(thw[0] * thw[1] * thw[2] // 4))
    q, k = _last_block_qk(model, inputs)
    seen = []
    real = selection.fastvid
    monkeypatch.setattr(selection, "fastvid", lambda *a, **kw: seen.append(a[1].clone()) or real(*a, **kw))
    for attention in ("auto", "received"):
        with torch.no_grad(), lmms_prune.apply(model, "fastvid", keep_ratio=0.5,
                                               fastvid_attention=attention) as handle:
            model(**inputs)
            assert handle.config.fastvid_attention == ("frame_query" if attention == "auto" else attention)
    authors, received = authors_frame_attention(q, k, tuple(thw), window_index).flatten(), _received(q, k, thw,
                                                                                                     window_index)
    torch.testing.assert_close(seen[0], authors, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(seen[1], received, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(seen[0], seen[1])
    # both signals in one encoder pass (here the same block: the capture chains onto the received-attention one)
    signals = []
    both = Needs(embeddings=True, vision_attention=True, vision_frame_attention=True)
    monkeypatch.setattr(FastVID, "needs", classmethod(lambda cls, config: both))
    monkeypatch.setattr(FastVID, "__call__", lambda self, image, scores, n: signals.append(image) or
                        torch.arange(image.span.num_visual))
    with torch.no_grad(), lmms_prune.apply(model, "fastvid", keep_ratio=0.5):
        model(**inputs)
    video = signals[0]
    torch.testing.assert_close(video.vision_frame_attention, authors, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(video.vision_attention, received, rtol=1e-4, atol=1e-6)


def test_fastvid_attention_resolves_per_variant_and_is_refused_where_the_tower_has_none():
    cfg = resolve_config("fastvid", keep_ratio=0.25)
    assert cfg.fastvid_attention == "auto"
    for family, attention in (("qwen2_5_vl", "frame_query"), ("qwen2_vl", "frame_query"),
                              ("llava_onevision", "received"), ("internvl", "received")):
        resolved = FastVID.for_family(cfg, family)
        assert resolved.fastvid_attention == attention
        assert resolved.needs().vision_frame_attention == (attention == "frame_query")
        assert resolved.needs().vision_attention == (attention == "received")
    on_qwen_lov = resolve_config("fastvid", keep_ratio=0.25, fastvid_variant="llava_onevision")
    assert FastVID.for_family(on_qwen_lov, "qwen2_5_vl").fastvid_attention == "received"
    named = resolve_config("fastvid", keep_ratio=0.25, fastvid_attention="received")
    assert FastVID.for_family(named, "qwen2_5_vl").fastvid_attention == "received"
    frame_query = resolve_config("fastvid", keep_ratio=0.25, fastvid_attention="frame_query")
    check_model(frame_query, Qwen2_5_VLConfig())
    with pytest.raises(ValueError, match="fastvid_attention='frame_query' on a llava_onevision model"):
        check_model(frame_query, LlavaOnevisionConfig())
    with pytest.raises(ValueError, match="fastvid_attention='cls'"):
        resolve_config("fastvid", fastvid_attention="cls")
