"""Every probe in the registry keeps the one protocol of :mod:`probes.base` (scikit-learn style).

``Cls(metrics, *, layers, heads, ...)`` only stores its arguments; ``fit(capture=None, *, model=None,
batch=None)`` checks its inputs, returns ``self`` and sets attributes ending in ``_``;
``to_frame()`` is the tidy per-head table. A probe added to ``PROBES`` is covered automatically;
give it small settings in ``SMALL`` when its defaults are slow on a tiny model.
"""

from __future__ import annotations

import inspect
import itertools

import pytest

import workbench
from probes.base import FRAME_COLUMNS
from probes.registry import PROBES
from workbench.errors import InputError, WorkbenchError

PROMPTS = ["The sky is blue today. Question: what colour is it? Answer:",
           "Paris is in France and Rome is in Italy. Question: where is Rome? Answer:"]
SPANS = [{"span": [1, 6]}, {"span": [1, 8]}]           # VHD reads its context span from meta
SMALL = {
    "importance": dict(validate_patching=False),
    "hess": dict(n_calibration=2, copy_seq_len=17, n_boot=50),
    "vhd": dict(top_k=2),
}
SUBSET_LAYERS, SUBSET_HEADS = [1], [0, 2]
NEEDS = {"needs_capture": ("capture", r"needs a capture"), "needs_model": ("model", r"needs the model"),
         "needs_batch": ("batch", r"needs the batch")}


@pytest.fixture(scope="module")
def inputs(tiny_llama):
    batch = tiny_llama.tokenize(PROMPTS, meta=[dict(m) for m in SPANS])
    full = workbench.capture(tiny_llama, batch, progress=False)
    subset = workbench.capture(tiny_llama, batch, layers=SUBSET_LAYERS, heads=SUBSET_HEADS, progress=False)
    return tiny_llama, batch, full, subset


def _params(cls) -> list[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]


def _fitted_names(probe) -> set[str]:
    return {name for name in vars(probe) if not name.startswith("__")}


def _check_frame(frame, cls, model) -> None:
    assert list(frame.columns) == FRAME_COLUMNS
    assert len(frame) > 0 and set(frame["probe"]) == {cls.name}
    assert set(frame["metric"]) <= set(cls.metrics)
    for column, count in (("layer", model.n_layers), ("head", model.n_heads)):
        values = frame[column].tolist()
        assert all(isinstance(v, int) for v in values), f"{column} values must be ints"
        assert all(0 <= v < count for v in values), f"{column} outside the model"
    assert not frame.duplicated(["layer", "head", "metric"]).any()
    grid = set(itertools.product(set(frame["layer"]), set(frame["head"])))
    for metric, rows in frame.groupby("metric"):
        assert set(zip(rows["layer"], rows["head"])) == grid, f"{metric}: not one row per (layer, head)"


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_protocol(name, inputs):
    cls = PROBES[name]
    model, batch, full, subset = inputs
    given = {"capture": full, "model": model, "batch": batch}

    # __init__ stores every argument under its own name, validates and derives nothing
    params = _params(cls)
    assert params[0] == "metrics" and {"layers", "heads"} <= set(params)
    odd = {param: object() for param in params}
    try:
        probe = cls(**odd)
    except Exception as err:  # noqa: BLE001 - any exception means __init__ looked at its arguments
        pytest.fail(f"{cls.__name__}.__init__ validates or derives from its arguments: {err!r}")
    assert probe.get_params() == odd and all(probe.get_params()[p] is odd[p] for p in params)
    assert _fitted_names(probe) == set(params), "__init__ stored something besides its arguments"
    assert not [a for a in dir(probe) if a.endswith("_") and not a.startswith("__")], "fitted before fit"
    with pytest.raises(WorkbenchError, match="not fitted"):
        cls().to_frame()
    with pytest.raises(InputError, match="unknown metric"):
        cls(["no-such-metric"], **SMALL.get(name, {})).fit(**{"capture": full, "model": model, "batch": batch})

    # a missing input is named, with how to pass it; the model where the capture goes is caught
    for flag, (missing, message) in NEEDS.items():
        if getattr(cls, flag):
            partial = {k: v for k, v in given.items() if k != missing}
            with pytest.raises(InputError, match=message):
                cls(**SMALL.get(name, {})).fit(**partial)
    with pytest.raises(InputError, match="capture"):
        cls(**SMALL.get(name, {})).fit(model)

    # fit returns self; results in new attributes ending in "_"; the arguments stay as given
    settings = dict(SMALL.get(name, {}))
    probe = cls(**settings)
    before = probe.get_params()
    assert probe.fit(full, model=model, batch=batch) is probe
    assert probe.get_params() == before
    new = _fitted_names(probe) - set(params)
    assert new and all(a.endswith("_") for a in new), sorted(a for a in new if not a.endswith("_"))
    frame = probe.to_frame()
    _check_frame(frame, cls, model)

    # a metric subset and a layer/head subset (model-based probes: via layers/heads; capture-based:
    # the capture holds the subset)
    metrics = [cls.metrics[-1]]
    probe = cls(metrics, layers=SUBSET_LAYERS, heads=SUBSET_HEADS, **settings)
    frame = probe.fit(subset if cls.needs_capture else full, model=model, batch=batch).to_frame()
    _check_frame(frame, cls, model)
    assert set(frame["metric"]) == set(metrics)
    assert set(frame["layer"]) == set(SUBSET_LAYERS) and set(frame["head"]) == set(SUBSET_HEADS)
    assert probe.get_params()["metrics"] is metrics
