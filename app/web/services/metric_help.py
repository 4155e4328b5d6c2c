"""One-line definitions of the metrics (from docs/metrics.md), shown when hovering a head."""

from __future__ import annotations

from probes.registry import PROBES

DEFINITIONS: dict[str, str] = {
    # docs/metrics.md §1 pattern statistics (per query row, averaged over rows, then samples)
    "entropy": "attention entropy H_i = -Σ_j A_ij log A_ij (nats), mean over query rows",
    "entropy_normalized": "entropy divided by log(number of visible keys): 0 = one key, 1 = uniform",
    "max_weight": "largest weight of each row, max_j A_ij, mean over rows",
    "first1_mass": "mass on the first token A_i0 (attention-sink mass)",
    "first4_mass": "mass on the first 4 tokens Σ_{j<4} A_ij (StreamingLLM's sink window)",
    "prev_token_mass": "mass on the previous token A_{i,i-1}",
    "self_mass": "mass on the token itself A_ii",
    "local_mass": "mass within 8 positions Σ_{|i-j|≤8} A_ij",
    "mean_distance": "mean attention distance Σ_j A_ij |i - j| (tokens)",
    # docs/metrics.md §2 detectors
    "previous_token": "previous-token score: mean over rows of A_{i,i-1}",
    "induction": "induction score: mass on tokens right after earlier copies of the current token",
    "duplicate_token": "duplicate-token score: mass on earlier occurrences of the same token",
}


def describe(probe: str | None, metric: str) -> str:
    """The definition of ``metric``; falls back to the probe's docstring summary."""
    if metric in DEFINITIONS:
        return DEFINITIONS[metric]
    cls = PROBES.get(probe or "")
    if cls is not None:
        helper = getattr(cls, "metric_descriptions", None)
        if isinstance(helper, dict) and metric in helper:
            return str(helper[metric])
        doc = (cls.__doc__ or "").strip().splitlines()
        if doc:
            return f"{metric} from probe '{cls.name}': {doc[0].strip()}"
    return f"{metric} (no definition recorded)"
