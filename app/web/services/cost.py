"""Run-time estimates of slow jobs, shown before they start: a count of forward-equivalents
(forwards of one input of ``n_tokens`` tokens; a backward counts 2) × the measured clean forward
of the analysed prompt (:attr:`app.web.services.analysis.Analysis.forward_s`), scaled linearly by
token count. Wall time on a shared CPU is noisy: the estimate is an order of magnitude."""

from __future__ import annotations

from app.web.services.analysis import Analysis


def seconds_per_forward(analysis: Analysis | None, model_name: str, n_tokens: int) -> float | None:
    """Seconds of one forward of an ``n_tokens`` input of ``model_name``, scaled from the analysis'
    measured forward; None without one (no analysis, another model, or not measured)."""
    if analysis is None or analysis.forward_s is None or analysis.model_name != model_name:
        return None
    return analysis.forward_s * max(1, n_tokens) / max(1, analysis.n_tokens)


def format_seconds(seconds: float) -> str:
    """``"<1 s"``, ``"~40 s"``, ``"~12 min"``."""
    if seconds < 1:
        return "<1 s"
    if seconds < 120:
        return f"~{seconds:.0f} s"
    return f"~{seconds / 60:.0f} min"


def cost_note(what: str, forwards: float, analysis: Analysis, n_tokens: int, seconds: float, *,
              bound: str = "up to", caveat: str = "batching makes it faster") -> str:
    """One line: what runs, how many forward-equivalents, and the time they make on this machine
    (``bound``: "up to" for counted copies that batch, "roughly" otherwise; ``caveat``: why it may differ)."""
    per = analysis.forward_s * 1000
    scaled = "" if n_tokens == analysis.n_tokens else f", scaled to {n_tokens} tokens"
    return (f"{what}: ~{forwards:,.0f} forwards of one {n_tokens}-token input, {bound} {format_seconds(seconds)} "
            f"on this machine ({per:.0f} ms measured forward of your {analysis.n_tokens}-token prompt{scaled}; "
            f"{caveat}); Cancel stops it within a layer")
