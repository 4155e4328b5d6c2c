"""Self-contained HTML report of a run: plotly heatmaps with plotly.js inlined (no CDN)."""

from __future__ import annotations

import html

import pandas as pd
import plotly.io as pio

from probes.figures import head_heatmap, kv_saliency_line, taxonomy_scatter, taxonomy_table


def build_report(heads: pd.DataFrame, manifest: dict, top_k: int = 5) -> str:
    """One HTML page: run facts, a top-heads table, the long-context taxonomy scatter (when the run
    has the retrieval and sparsity probes) and a layer × head heatmap per metric."""
    parts = []
    first = True
    taxonomy = ""
    if {"retrieval_score", "streaming_mass"} <= set(heads["metric"]):
        kv = kv_saliency_line(manifest.get("kv_saliency") or {})
        note = f"<br><sup>{kv}</sup>" if kv else ""
        fig = taxonomy_scatter(taxonomy_table(heads), title=f"every head by streaming mass and retrieval score{note}")
        taxonomy = "<h2>Long-context taxonomy</h2>" + pio.to_html(fig, include_plotlyjs=True, full_html=False)
        first = False
    for (probe, metric), rows in heads.groupby(["probe", "metric"], sort=False):
        fig = head_heatmap(rows, metric, title=f"{probe} / {metric}")
        fig.update_layout(height=max(320, 18 * rows["layer"].nunique() + 120))
        parts.append(pio.to_html(fig, include_plotlyjs=True if first else False, full_html=False))
        first = False
    top = (heads.dropna(subset=["value"]).sort_values("value", ascending=False)
           .groupby(["probe", "metric"], sort=False).head(top_k))
    facts = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in manifest.items() if not isinstance(v, dict))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Attention workbench report: {html.escape(str(manifest.get('model')))}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}</style></head>
<body><h1>Attention workbench report</h1>
<table>{facts}</table>
<h2>Top {top_k} heads per metric</h2>
{top.to_html(index=False, float_format=lambda x: f"{x:.4g}")}
{taxonomy}
<h2>Layer × head maps</h2>
{''.join(parts)}
</body></html>"""
