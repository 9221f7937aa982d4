"""The ``lmms_eval.models`` entry point: model manifests, built without importing torch or transformers.

lmms-eval calls ``manifests()`` when it builds its model registry; class paths are strings that it
imports only when a model is actually requested.
"""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest

# model id -> chat class path
MODELS: dict[str, str] = {}


def manifests() -> list[ModelManifest]:
    """Every model this package registers with lmms-eval."""
    return [ModelManifest(model_id=name, chat_class_path=path) for name, path in MODELS.items()]
