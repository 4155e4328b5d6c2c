"""Reading plotly click events (``clickData``) into head indices."""

from __future__ import annotations


def _as_list(custom) -> list | None:
    """Plotly sends customdata as a list, or (typed arrays) as an index-keyed object."""
    if isinstance(custom, list):
        return custom
    if isinstance(custom, dict):
        try:
            return [custom[k] for k in sorted(custom, key=int)]
        except (ValueError, TypeError):
            return None
    return None


def head_from_click(click: dict | None, *, heatmap: bool) -> tuple[int, int] | None:
    """``(layer, head)`` of a clicked point, or None.

    Heatmaps of :func:`probes.figures.head_heatmap` have heads on x and layers on y (categories);
    scatter points carry ``customdata = [layer, head, ...]``.
    """
    if not click or not click.get("points"):
        return None
    point = click["points"][0]
    try:
        if heatmap:
            return int(point["y"]), int(point["x"])
        custom = _as_list(point.get("customdata"))
        return (int(custom[0]), int(custom[1])) if custom else None
    except (KeyError, TypeError, ValueError):
        return None
