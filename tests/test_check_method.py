"""``lmms-prune check-method`` on every built-in preset (CI's subset), and on external methods.

CI runs every check of every built-in preset on ONE family's tiny model, built once (InternVL with a Llama
decoder: the cheapest to build; the video presets ``temporal``, ``evs``, ``vidcom2``, ``fastvid``, ``dycoke``,
``holitom`` and ``holitom_full`` on Qwen2.5-VL; ``mustdrop_authors`` on LLaVA-1.5). The full matrix, every
family, is ``for p in $(python -c "from lmms_prune.presets import PRESETS; print(*PRESETS)"); do lmms-prune
check-method $p; done`` (docs/extending.md).
"""

from __future__ import annotations

import pytest
import torch

from lmms_prune import conformance
from lmms_prune.conformance import CHECKS
from lmms_prune.presets import PRESETS

torch.set_num_threads(1)
VIDEO_PRESETS = ("temporal", "evs", "vidcom2", "fastvid", "dycoke", "holitom", "holitom_full")  # run on Qwen2.5-VL, whose videos they are for
CI_FAMILY = dict.fromkeys(VIDEO_PRESETS, "qwen2_5_vl")  # every other preset: internvl_llama
CI_FAMILY["mustdrop_authors"] = "llava"  # its in-tower merge runs on CLIP's tower only
# n/a in CI's family, for the reason given (every other cell must pass)
EXPECTED_NA = {(p, "video prune = mask"): "no video" for p in PRESETS if p not in VIDEO_PRESETS} | {
    (p, c): "stage none" for p in ("none", "downsample") for c in ("cache = recompute", "budget 1", "budget N")} | {
    (p, "cache = recompute"): "multi-stage" for p in ("pyramiddrop", "sparsevlm", "feather", "vscan", "holitom_full",
                                                "mustdrop_authors")} | {
    (p, c): "merged tokens" for p in ("visionzip", "prumerge_plus", "mustdrop", "holitom")
    for c in ("prune = mask", "cache = recompute")} | {
    ("fastvid", c): "merged tokens" for c in ("prune = mask", "cache = recompute", "video prune = mask")} | {
    ("holitom", "video prune = mask"): "merged tokens"} | {
    (p, c): "videos only" for p in ("evs", "vidcom2", "fastvid", "dycoke", "holitom", "holitom_full")
    for c in ("budget 1", "budget N")} | {
    ("fixed", c): "needs keep_indices" for c in CHECKS}  # an oracle: tests/test_engine.py proves it directly


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_builtin_preset_passes_check_method(left_padded_toys, preset):
    family = CI_FAMILY.get(preset, "internvl_llama")
    model, proc = left_padded_toys(family)
    results = conformance.check_family(preset, family, model=model, proc=proc, decode=3)
    assert [r.check for r in results] == list(CHECKS)
    for r in results:
        expected = EXPECTED_NA.get((preset, r.check))
        if expected is None:
            assert r.status == "pass", f"{preset} {r.check}: {r.status} {r.reason}"
        else:
            assert r.status == "n/a" and expected in r.reason, f"{preset} {r.check}: {r.status} {r.reason}"
