"""The ``lmms_eval.models`` entry point: model manifests, built without importing torch or transformers.

lmms-eval calls ``manifests()`` when it builds its model registry; class paths are strings that it
imports only when a model is actually requested.
"""

from __future__ import annotations

from lmms_prune.presets import PRESETS

# model id -> chat class path
MODELS: dict[str, str] = {
    "grounding_oracle": "lmms_prune.models.oracle.GroundingOracle",
}

# Pruned VLM wrappers (models/base.py): <family>_prune takes method=...; <family>_<preset> fixes the method.
PRUNED_FAMILIES: dict[str, str] = {
    "internvl": "lmms_prune.models.internvl.InternVLPrune",
    "qwen2_5_vl": "lmms_prune.models.qwen2_5_vl.Qwen25VLPrune",
    "llava": "lmms_prune.models.llava.LlavaPrune",
}
for _family, _path in PRUNED_FAMILIES.items():
    MODELS[f"{_family}_prune"] = _path
    MODELS.update({f"{_family}_{_preset}": f"{_path}_{_preset}" for _preset in PRESETS})


def manifests() -> list:
    """Every model this package registers with lmms-eval (a list of lmms-eval ``ModelManifest``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    # lmms-eval calls this before it imports lmms_eval.tasks; see lmms_prune/tasks/takeover.py.
    from lmms_prune.tasks.takeover import install

    install()
    return [ModelManifest(model_id=name, chat_class_path=path) for name, path in MODELS.items()]
