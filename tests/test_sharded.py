"""Mergeable aggregates: any split of a dataset, merged in any order, gives the one-process numbers."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from probes import sharded
from probes.aggregate import MomentSums, merge_all
from probes.base import mean_and_ci
from probes.importance import HeadImportance
from probes.pipeline import analyze, build_probes
from probes.retrieval import Retrieval
from probes.sinks import Sinks
from probes.sparsity_profile import SparsityProfile
from workbench.errors import InputError

KEYS = ["layer", "head", "probe", "metric"]


@st.composite
def split_samples(draw):
    """``[S, 2, 3]`` values (NaN = undefined sample), cut into parts merged in a random order."""
    n = draw(st.integers(1, 24))
    finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
    values = draw(arrays(np.float64, (n, 2, 3), elements=st.one_of(finite, st.just(np.nan))))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=5)))
    bounds = list(zip([0] + cuts, cuts + [n]))
    order = draw(st.permutations(range(len(bounds))))
    bounded = draw(st.booleans())
    if bounded:  # a bounded metric: values in [0, 1], interval on the logit scale
        values = np.abs(np.tanh(values))
    return values, [bounds[i] for i in order], (0.0, 1.0) if bounded else None


def _close(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=1e-9, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(split_samples())
def test_any_split_merged_in_any_order_equals_the_whole(case):
    values, parts, bounds = case
    whole = mean_and_ci(torch.from_numpy(values), bounds=bounds)
    merged = merge_all(MomentSums.from_samples(values[a:b]) for a, b in parts)
    assert np.array_equal(merged.count, np.isfinite(values).sum(0))
    for got, want in zip(merged.mean_ci(bounds=bounds), whole):
        _close(got, want)


def test_merge_is_the_identity_with_no_samples():
    values = np.random.default_rng(0).normal(size=(5, 3))
    part = MomentSums.from_samples(values)
    for got, want in zip(part.merge(MomentSums.empty((3,))).mean_ci(), part.mean_ci()):
        _close(got, want)


def _probes():
    return [*build_probes("stats,detectors").values(), Sinks(tau=3.0),
            HeadImportance(["ablation_zero", "gradient"], validate_patching=False)]


def _sharded_run(model, batch, probes, bounds, layers, heads, mode="patterns"):
    by_name = {p.name: p for p in sharded.fresh_probes(probes)}
    results = [sharded.run_shard(model, batch.select(slice(a, b)), probes, i, a, b, mode=mode, layers=layers,
                                 heads=heads) for i, (a, b) in enumerate(bounds)]
    rerun, redo = sharded.sinks_reruns(by_name, results)
    for i in redo:
        again = sharded.run_shard(model, batch.select(slice(*bounds[i])), [rerun], i, *bounds[i], mode=mode,
                                  layers=layers, heads=heads)
        sharded.merge_rerun(results[i], again)
    return sharded.finish(by_name, results[::-1], layers, heads), redo


@pytest.mark.parametrize("bounds", [[(0, 2), (2, 3), (3, 6)], [(0, 5), (5, 6)]])
def test_shards_of_the_pipeline_merge_to_the_one_process_table(tiny_llama, bounds):
    from workbench.data import load_dataset

    batch = load_dataset("induction", tiny_llama, n=6)
    layers, heads = [0, 1], [0, 2, 3]
    whole = analyze(tiny_llama, batch, probes=sharded.fresh_probes(_probes()), mode="patterns", layers=layers,
                    heads=heads, progress=False).table
    (table, fitted, notes), redo = _sharded_run(tiny_llama, batch, _probes(), bounds, layers, heads)
    assert not notes and redo, "tau=3 makes each shard find its own sink dimensions: they must be re-run"
    assert table[KEYS].equals(whole[KEYS])
    for column in ("value", "ci_low", "ci_high"):
        a, b = whole[column].to_numpy(float), table[column].to_numpy(float)
        assert np.array_equal(np.isnan(a), np.isnan(b))
        # float32 per-sample values: gradient normalises float32 values in the one-process run
        np.testing.assert_allclose(b[~np.isnan(b)], a[~np.isnan(a)], rtol=1e-5, atol=1e-6)
    assert fitted["sinks"].n_samples_ == 6


def test_shard_files_round_trip(tiny_llama, tmp_path):
    from workbench.data import load_dataset

    batch = load_dataset("induction", tiny_llama, n=2)
    result = sharded.run_shard(tiny_llama, batch, _probes(), 3, 4, 6, mode="patterns", layers=[0, 1],
                               heads=[0, 1, 2, 3])
    path = tmp_path / "shard.safetensors"
    sharded.save_shard(path, result)
    back = sharded.load_shard(path)
    assert (back.index, back.start, back.stop, back.info) == (3, 4, 6, result.info)
    assert sorted(back.moments) == sorted(result.moments) and sorted(back.flags) == sorted(result.flags)
    for key, moments in result.moments.items():
        for field in ("count", "mean", "m2"):
            assert np.array_equal(getattr(back.moments[key], field), getattr(moments, field), equal_nan=True)
    assert np.array_equal(back.flags["sinks/flagged"], result.flags["sinks/flagged"])


def _needle_batch(model):
    """4 needle samples of 200 tokens with a short plain prompt at index 2 (no needle: NaN retrieval)."""
    from workbench.data import load_dataset

    needles = load_dataset("needle", model, n=4, seq_len=200)
    plain = model.tokenize(["The cat sat on the mat and looked at the dog for a long while."])
    rows = [(needles, 0), (needles, 1), (plain, 0), (needles, 2), (needles, 3)]
    return model.batch_from_ids([b.tokens[i][b.mask[i]] for b, i in rows], [dict(b.meta[i]) for b, i in rows])


def _long_context_probes():
    return [Retrieval(generate=True), SparsityProfile(window=32)]


@pytest.mark.parametrize("mode", ["stats", "patterns"])
def test_long_context_shards_merge_to_the_one_process_run(tiny_llama, tmp_path, mode):
    batch = _needle_batch(tiny_llama)
    sharded.check_shardable({p.name: p for p in _long_context_probes()}, batch)
    whole = analyze(tiny_llama, batch, probes=_long_context_probes(), mode=mode, progress=False)
    layers, heads = whole.layers, whole.heads
    paths = []
    for i, (a, b) in enumerate([(0, 2), (2, 3), (3, 5)]):  # shard 1 holds only the plain prompt
        paths.append(tmp_path / f"shard-{i}.safetensors")
        sharded.save_shard(paths[-1], sharded.run_shard(tiny_llama, batch.select(slice(a, b)),
                                                        _long_context_probes(), i, a, b, mode=mode,
                                                        layers=layers, heads=heads))
    by_name = {p.name: p for p in _long_context_probes()}
    table, fitted, notes = sharded.finish(by_name, [sharded.load_shard(p) for p in paths[::-1]], layers, heads)
    assert not notes and table[KEYS].equals(whole.table[KEYS])
    assert set(table["metric"]) == {*Retrieval.metrics, *SparsityProfile.metrics}
    for column in ("value", "ci_low", "ci_high"):
        a, b = whole.table[column].to_numpy(float), table[column].to_numpy(float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), column
        assert np.isfinite(a).any(), column
        np.testing.assert_allclose(b[~np.isnan(b)], a[~np.isnan(a)], rtol=0, atol=1e-6)
    local, merged = whole.probes, fitted
    assert merged["sparsity"].kv_saliency_ == local["sparsity"].kv_saliency_
    assert merged["sparsity"].kv_saliency_share_90_ == local["sparsity"].kv_saliency_share_90_
    assert merged["retrieval"].n_needle_samples_ == local["retrieval"].n_needle_samples_ == 4
    assert merged["retrieval"].generated_ == local["retrieval"].generated_
    assert merged["retrieval"].generated_[2] is None and merged["retrieval"].answer_correct_[2] is None
    assert merged["retrieval"].answer_correct_ == local["retrieval"].answer_correct_


@pytest.mark.parametrize("probes,metrics,message", [
    ("hess", None, "probe 'hess' cannot be split"),
    ("importance", "ablation_zero,ablation_mean", "metric 'ablation_mean' takes its reference"),
    ("importance", "attribution_patching", "metric 'attribution_patching' takes its reference"),
])
def test_what_a_shard_would_change_is_refused(tiny_llama, probes, metrics, message):
    from workbench.data import load_dataset

    batch = load_dataset("induction", tiny_llama, n=2)
    with pytest.raises(InputError, match=message):
        sharded.check_shardable(build_probes(probes, metrics), batch)


def test_resample_intervention_is_refused(tiny_llama):
    from workbench.data import load_dataset
    from workbench.interventions import as_intervention_set

    batch = load_dataset("induction", tiny_llama, n=2)
    spec = as_intervention_set("L0H1:resample").with_reference(batch)
    with pytest.raises(InputError, match="resample intervention"):
        sharded.check_shardable(build_probes("stats"), batch, spec)
