"""Run-time estimates of slow jobs, shown before they start: a count of forward-equivalents
(forwards of one input of ``n_tokens`` tokens; a backward counts 2) × the measured clean forward
of the analysed prompt (:attr:`app.web.services.analysis.Analysis.forward_s`), scaled to another
length by the forward's arithmetic (:func:`forward_flops`: the blocks' matmuls grow with the
length, causal attention with its square). Wall time on a shared CPU is noisy and a short
prompt's forward is mostly fixed overhead: the estimate is an order of magnitude."""

from __future__ import annotations

from app.web.services.analysis import Analysis


def forward_flops(model, n_tokens: int) -> float:
    """Arithmetic of one forward of ``n_tokens`` tokens through the blocks of a loaded
    :class:`workbench.model.HookedModel`, in FLOPs: 2 × the blocks' parameters per token (every
    matmul; the embedding is a lookup) plus causal attention's ``QKᵀ`` and ``A·V``,
    ``2·n²·d_head`` per query head and layer (half of each square is masked)."""
    hf = model.bridge.original_model
    embedding = hf.get_input_embeddings().weight
    params = sum(p.numel() for p in hf.parameters()) - embedding.numel()
    head = hf.get_output_embeddings()
    if head is not None and head.weight is not embedding:
        params -= head.weight.numel()
    n = max(1, n_tokens)
    return 2.0 * params * n + 2.0 * n * n * model.d_head * model.n_heads * model.n_layers


def seconds_per_forward(analysis: Analysis | None, model_name: str, n_tokens: int) -> float | None:
    """Seconds of one forward of an ``n_tokens`` input of ``model_name``: the analysis' measured
    forward × :func:`forward_flops` at ``n_tokens`` / at the analysis' length; None without a
    measured forward of that model (no analysis, another model, or not measured)."""
    if analysis is None or analysis.forward_s is None or analysis.model_name != model_name:
        return None
    if n_tokens == analysis.n_tokens:
        return analysis.forward_s
    from workbench.model import load_model

    model = load_model(model_name)  # the analysis' model: still loaded (the app keeps it)
    return analysis.forward_s * forward_flops(model, n_tokens) / forward_flops(model, analysis.n_tokens)


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
