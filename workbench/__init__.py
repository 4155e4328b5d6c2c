"""Attention workbench, notebook API.

    import workbench as wb
    from probes import Detectors, PatternStats, head_heatmap

    model = wb.load_model("smollm2-135m")                 # pulled and converted on first use
    batch = wb.load_dataset("induction", model, n=8)
    cap = wb.capture(model, batch)                        # one forward, per-head statistics
    det = Detectors().fit(cap)
    det.to_frame()                                        # tidy table: layer, head, metric, value, CI
    head_heatmap(det.to_frame(), "induction")             # plotly figure
"""

from workbench.batch import TokenBatch
from workbench.capture import Capture, capture
from workbench.data import list_datasets, load_dataset
from workbench.errors import CorruptModelError, InputError, ModelNotFoundError, WorkbenchError
from workbench.model import HookedModel, load_model
from workbench.registry import DEFAULT_MODEL, REGISTRY
from workbench.runstore import read_run

__all__ = [
    "Capture", "CorruptModelError", "DEFAULT_MODEL", "HookedModel", "InputError", "ModelNotFoundError",
    "REGISTRY", "TokenBatch", "WorkbenchError", "capture", "list_datasets", "load_dataset", "load_model",
    "read_run",
]
