"""The long-context rows (``Capture.extras["lc.*"]``) a probe reads, from its capture or a recapture.

The pipeline asks the one capture for them when a probe with a ``long_context_request()`` runs
(:func:`probes.pipeline.analyze`). A probe fitted by hand on a capture made without them gets them
from a second capture of the same tokens with the model (``fit(capture, model=model)``); without
the model it says how to capture them.
"""

from __future__ import annotations

from workbench.batch import TokenBatch
from workbench.capture import Capture, capture
from workbench.errors import InputError
from workbench.long_context import LongContextSettings


def has_rows(cap: Capture, settings: LongContextSettings) -> bool:
    """True when ``cap`` holds the ``lc.*`` rows ``settings`` asks for (blocks with the same settings)."""
    if "lc.argmax" not in cap.extras:
        return False
    if not settings.blocks:
        return True
    have = cap.info.get("long_context") or {}
    return bool(have.get("blocks")) and {k: v for k, v in have.items() if k != "blocks"} == \
        {k: v for k, v in settings.as_dict().items() if k != "blocks"}


def long_context_capture(who: str, cap: Capture, model, settings: LongContextSettings) -> Capture:
    """``cap`` itself when it has the rows, else a capture of its tokens (same layers, heads, mode and
    interventions) that has them.

    Raises:
        InputError: the rows are missing and no model was given.
    """
    if has_rows(cap, settings):
        return cap
    if model is None:
        raise InputError(f"the {who} probe needs the long-context rows of the capture: capture with "
                         "long_context=LongContextSettings(...) (the pipeline does), or call fit(capture, model=model)")
    batch = TokenBatch(cap.tokens, cap.mask, [dict(m) for m in cap.meta])
    return capture(model, batch, layers=cap.layers, heads=cap.heads, mode=cap.mode, progress=False,
                   interventions=cap.info.get("interventions"), detectors=False, long_context=settings)


def manifest_facts(probes: dict) -> dict:
    """Dataset-level long-context facts of fitted probes for a run manifest: the KV saliency share
    (``sparsity``) and the greedy answers (``retrieval`` with ``generate``); ``{}`` when neither ran."""
    facts: dict = {}
    sparsity = probes.get("sparsity")
    if sparsity is not None and hasattr(sparsity, "kv_saliency_"):
        facts["kv_saliency"] = sparsity.kv_saliency_
    retrieval = probes.get("retrieval")
    if retrieval is not None and hasattr(retrieval, "generated_"):
        facts["generated_answers"] = [{"text": t, "correct": c}
                                      for t, c in zip(retrieval.generated_, retrieval.answer_correct_)]
    return facts
