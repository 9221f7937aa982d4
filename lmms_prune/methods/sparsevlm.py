"""SparseVLM (Zhang et al., 2025, "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML): text raters, multi-layer adaptive pruning and token recycling inside the LLM (methods.md 5b).

At each of ``prune_layers`` (stage ``s``, layer ``K_s``, scored at ``K_s - 1``):

1. Raters (paper 3.2): the text tokens after the sample's last image whose attention mass on the image is at
   least the mean mass (:func:`lmms_prune.scores.select_raters`), chosen anew per image and stage.
2. Importance: the raters' mean attention row over the visual tokens still present (``query='raters'`` of the
   ``attention`` score; ``score='trend'`` debiases that row by its positional trend at every stage, as the
   attention-debiasing paper applies its fix to SparseVLM).
3. Adaptive count (paper 3.3, ``N_del = lambda (L_v - rank(P))``, ``P`` the raters' rows): the stage keeps
   :func:`lmms_prune.selection.adaptive_keep_count` tokens, top by importance.
4. Recycling (paper 3.4): of the deleted tokens, the top ``recycle_ratio`` by importance are clustered by
   DPC-kNN (:func:`lmms_prune.selection.dpc_knn`) on their hidden states into ``floor(m * cluster_ratio) + 1``
   groups; each group's mean hidden state replaces the hidden state of its centre, which stays
   (:meth:`lmms_prune.engine.core.PruneHandle._place_merge`).

Choices and differences (paper; authors' code read at github.com/Gumpest/SparseVLMs: v1 at commit
b72c5d62fa70 (``llava/model/language_model/score.py``, ``modelling_sparse_llama.py``, ``utils.py``), branch
``v1.5`` at 734d90038796 and ``main`` at 26a5f48813c4; nothing copied; docs/fidelity.md has the details):

* Layers: the authors prune the OUTPUT of decoder layers 2, 6, 15 (HEAD; v1 also 19) of LLaVA-1.5-7B's 32,
  ranking with those layers' own attention: in this project's convention (methods.md 2) ``prune_layers=3,7,16``,
  scored at ``K-1`` = 2, 6, 15, the same attention. ``prune_layers='auto'`` keeps the fractions 3/32, 7/32,
  16/32 of the depth (rounded half up; 14 layers: 1, 3, 7).
* Raters: the authors choose them once, from the LLM-input embeddings (``softmax`` over the text of
  ``H_v H_t^T``, averaged over the visual tokens, kept when above the mean). Here: per stage, from the attention
  at the scoring layer (each text row's mass on the image >= the mean mass), the spec's "raters chosen by their
  attention to vision", a signal the engine records at no extra pass. Text: the tokens after the sample's last
  image (the question and the template's closing tokens), for every image of the sample.
* Adaptive count: the paper's ``lambda`` is a free scale; the authors' v1 code keeps ``13.5 * rank`` tokens and
  their current code a fixed list per budget (e.g. 300/200/110 of 576 for "192"). Here ``lambda`` is set by the
  budget so that budgets match across methods: the stage's schedule count ``n`` (as PyramidDrop's, below) gives
  ``lambda = (N - n) / N`` and the stage keeps ``N - floor(lambda (N - rank P))`` >= ``n``; the rank spares
  ``lambda * rank`` tokens more. Rank: ``torch.linalg.matrix_rank`` in float64 (default tolerance).
* Budget rule: ``keep_ratio`` (default 1/3, the paper's 192 of 576) is the AVERAGE number of visual tokens per
  decoder layer over all ``L`` layers -- the first-order FLOPs equivalent, as the authors' comment
  ``2*576 4*300 10*200 16*110`` (= 191 per layer) -- solved into the per-stage schedule of PyramidDrop's rule
  (:func:`lmms_prune.selection.stage_ratio_for_average`); or ``stage_ratio`` directly. The rank's extra tokens
  and the recycled tokens come on top (the authors' count also adds the recycled ones), so the achieved
  average is at least the target: the per-layer counts are in ``PruneRecord.kv_lengths`` and the efficiency
  records, and ``lmms-prune report --match flops`` compares at equal FLOPs.
* Recycling: the authors' counts (``int(0.3 d) + 1`` recycled of ``d`` deleted, ``int(m / 10) + 1`` clusters,
  kNN density with ``k`` = the number of clusters, plain means). Differences: density ties are broken by the
  lower index (the authors add random noise); the merged token takes its cluster centre's place in the sequence
  and the KV cache (the authors insert the merged tokens after the kept visual tokens, so after renumbering a
  merged token's position is that of its centre's rank among the survivors here, and after the last kept visual
  token there); the merged tokens take part in later stages like any token.
* Positions (``positions``): ``'contiguous'`` (default) renumbers the survivors after each stage and decoding
  continues from the renumbered length at each stage's layers, as the authors' ``main`` with its default
  ``USE_VERSION=1_0`` (``position_ids[:, :new_len]`` after pruning and recycling; a decoded token takes its
  layer's cache length) and v1; ``'original'`` keeps every token's original position, as their SparseVLM+ path
  (``USE_VERSION=2_0``, "idea1: Keep Position ID"). Both equal mask mode (the engine's proof).
* Not offered: SparseVLM+ (their v2: RoPE "gravity" correction, head selection, no recycling).
"""

from __future__ import annotations

from lmms_prune.methods.base import Needs, Param, Preset, S, Selector, sel

SPARSEVLM_FRACTIONS = (3 / 32, 7 / 32, 16 / 32)  # LLaVA-1.5-7B: prune_layers 3, 7, 16 of 32

PARAMS = (
    Param("recycle_ratio", 0.3, "sparsevlm: fraction tau of each stage's deleted tokens (top by importance) that "
          "are recycled into merged tokens (floor(d*tau)+1 of d; 0 = no recycling)", low=0.0, high=1.0),
    Param("cluster_ratio", 0.1, "sparsevlm: merged tokens per recycled token: floor(m*cluster_ratio)+1 DPC-kNN "
          "clusters of the m recycled tokens, each replaced by its mean hidden state at its centre's place",
          low=0.0, high=1.0),
)


class SparseVLM(Selector):
    """Rank-adaptive top-k of the (rater) importance + recycling of the deleted tokens."""

    name = "sparsevlm"
    params = ("recycle_ratio", "cluster_ratio")
    stages = ("llm",)
    subsets = True
    merges = True
    layer_fractions = SPARSEVLM_FRACTIONS

    @classmethod
    def needs(cls, config):
        return Needs(text_attention=(config.effective_score_layer,), hidden=True)

    def __call__(self, image, scores, n):
        rows = image.text_attention[self.config.effective_score_layer]
        raters = S.select_raters(rows)
        return sel.sparsevlm(scores.to(image.hidden.device), rows[raters].to(image.hidden.device), image.hidden, n,
                             recycle_ratio=self.config.recycle_ratio, cluster_ratio=self.config.cluster_ratio)


SELECTORS = (SparseVLM,)
PRESETS = (
    Preset("sparsevlm", "SparseVLM: text raters' attention ranks the visual tokens at prune_layers (LLaVA-1.5: "
           "3,7,16 of 32; auto: scaled), rank-adaptive deletions, deleted tokens recycled into merged tokens, "
           "survivors renumbered (positions=contiguous, as the authors' default path); "
           "keep_ratio = average visual tokens per layer (1/3: the paper's 192 of 576)",
           dict(stage="llm", selector="sparsevlm", score="attention", query="raters", prune_layers="auto",
                keep_ratio=1 / 3, stage_ratio=None)),
)
