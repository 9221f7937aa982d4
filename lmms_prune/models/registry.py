"""The ``lmms_eval.models`` entry point: model manifests, built without importing torch or transformers.

lmms-eval calls ``manifests()`` when it builds its model registry; class paths are strings that it
imports only when a model is actually requested. The names are every family row x every preset
(``<family>_<preset>``, and ``<family>_prune`` with ``method=``).
"""

from __future__ import annotations

from lmms_prune.families import FAMILIES
from lmms_prune.presets import PRESETS

WRAPPERS = "lmms_prune.models.wrappers"

# model id -> chat class path
MODELS: dict[str, str] = {
    "grounding_oracle": "lmms_prune.models.oracle.GroundingOracle",
}
for _family, (_module, _stem) in FAMILIES.items():
    MODELS[f"{_family}_prune"] = f"{WRAPPERS}.{_stem}"
    MODELS.update({f"{_family}_{_preset}": f"{WRAPPERS}.{_stem}_{_preset}" for _preset in PRESETS})
# model id -> simple class path (``--force_simple``, which multiple-choice and loglikelihood tasks need): the
# twin of each wrapper (lmms_prune.models.base.simple_class; the name is models.base.simple_name's)
SIMPLE_MODELS: dict[str, str] = {name: f"{path}_simple" for name, path in MODELS.items() if path.startswith(WRAPPERS)}


def manifests() -> list:
    """Every model this package registers with lmms-eval (a list of lmms-eval ``ModelManifest``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    # lmms-eval calls this before it imports lmms_eval.tasks; see lmms_prune/tasks/takeover.py.
    from lmms_prune.tasks.takeover import install

    install()
    return [ModelManifest(model_id=name, chat_class_path=path, simple_class_path=SIMPLE_MODELS.get(name))
            for name, path in MODELS.items()]
