"""A tiny multi-round task (``multiround_tiny.yaml``) in lmms-eval's per-round protocol: ``doc_to_text`` gives the
first question (a string) and, called with ``round_idx = k > 0`` and the answers so far, the next round as
``(visuals, text, terminal, answers, round_info)``. Three rounds: POPE's question, then a follow-up that quotes
the previous answer (so each round depends on the last), then a text-only question; then done."""

from __future__ import annotations

from lmms_eval.tasks.pope.utils import pope_doc_to_visual

ROUNDS = 3


def doc_to_visual(doc):
    return pope_doc_to_visual(doc)


def doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    if not round_idx:
        return f"{doc['question']}\nAnswer the question using a single word or phrase."
    if round_idx >= ROUNDS:
        return None, None, True, previous_output, previous_round_info
    info = {"asked": (previous_round_info or {}).get("asked", 1) + 1}
    if round_idx == 1:
        return pope_doc_to_visual(doc), f"You said: {previous_output[-1]}. Are you sure?", False, previous_output, info
    return None, f"Name one colour. Earlier you said: {previous_output[-1]}", False, previous_output, info


def process_results(doc, results):
    """The number of rounds answered (a list of answers from a model, or lmms-eval's string of a tuple)."""
    answers = results[0]
    return {"rounds": len(answers) if isinstance(answers, list) else answers.count("', '") + 1}
