"""Head importance probe: planted dead head, normalisation, agreement with interventions, patching."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from probes.importance import HeadImportance
from probes.pruning import clean_run, logits_from_layer, pruning_curve
from probes.registry import PROBES
from workbench import intervened_run as ir
from workbench.errors import InputError, WorkbenchError
from workbench.interventions import HeadIntervention as HI, InterventionSet
from workbench.model import load_model

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Mary and John went to the store",
           "One two three four five six seven", "The capital of France is Paris"]
DEAD = (0, 2)  # (layer, head) whose output-projection slice W_O[h] is zero in the planted model
ABLATIONS = ["ablation_zero", "ablation_mean", "ablation_resample"]


@pytest.fixture(scope="module")
def planted(tiny_llama, tmp_path_factory):
    """tiny-llama with ``o_proj`` columns of head 2 in layer 0 set to zero (a fresh model folder)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("planted") / "tiny-llama-dead-head"
    shutil.copytree(tiny_llama.folder, folder)
    hf = AutoModelForCausalLM.from_pretrained(str(folder))
    d = tiny_llama.d_head
    with torch.no_grad():
        hf.model.layers[DEAD[0]].self_attn.o_proj.weight[:, DEAD[1] * d:(DEAD[1] + 1) * d] = 0
    hf.save_pretrained(str(folder))
    return load_model(str(folder))


@pytest.fixture(scope="module")
def batch(tiny_llama):
    return tiny_llama.tokenize(PROMPTS)


@pytest.fixture(scope="module")
def fitted(tiny_llama, batch):
    return HeadImportance().fit(model=tiny_llama, batch=batch)


def test_dead_head_has_zero_importance(planted, batch):
    probe = HeadImportance().fit(model=planted, batch=batch)
    layer, head = DEAD
    for metric in ABLATIONS + ["attribution_patching"]:
        assert np.abs(probe.per_sample_[metric][:, layer, head].numpy()).max() < 1e-5, metric
        assert np.abs(probe.mean_[metric]).max() > 1e-4, f"{metric}: every head is zero"
    assert probe.per_sample_["gradient"][:, layer, head].abs().max() == 0
    assert probe.mean_["gradient"][layer].max() > 0


def test_values_finite_and_frame(fitted, tiny_llama):
    frame = fitted.to_frame()
    assert list(frame.columns) == ["layer", "head", "probe", "metric", "value", "ci_low", "ci_high"]
    assert len(frame) == len(HeadImportance.metrics) * tiny_llama.n_layers * tiny_llama.n_heads
    assert np.isfinite(frame["value"]).all() and np.isfinite(frame["ci_low"]).all()
    assert (frame["ci_low"] <= frame["value"] + 1e-12).all() and (frame["value"] <= frame["ci_high"] + 1e-12).all()
    assert np.isfinite(fitted.clean_loss_)


def test_gradient_unit_norm_per_layer(fitted):
    norms = np.linalg.norm(fitted.mean_["gradient"], axis=-1)
    assert np.allclose(norms, 1.0, atol=1e-5)


@pytest.mark.parametrize("metric,kind", [("ablation_zero", "zero"), ("ablation_mean", "mean"),
                                         ("ablation_resample", "resample")])
def test_ablations_match_interventions(fitted, tiny_llama, batch, metric, kind):
    """The batched engine agrees with one intervened forward per head (reference = the batch)."""
    clean = ir.loss(tiny_llama, batch, per_token=True).nanmean(1)
    for layer, head in [(0, 1), (1, 3)]:
        spec = InterventionSet([HI(layer, head, kind)], reference=batch)
        delta = ir.loss(tiny_llama, batch, spec, per_token=True).nanmean(1) - clean
        assert torch.allclose(fitted.per_sample_[metric][:, layer, head], delta, atol=1e-5)


def test_partial_forward_equals_full(tiny_llama, batch):
    logits, _, inputs = clean_run(tiny_llama, batch, layer_inputs=True)
    for layer in range(tiny_llama.n_layers):
        assert torch.allclose(logits_from_layer(tiny_llama, batch, layer, inputs[layer])[batch.mask],
                              logits[batch.mask], atol=1e-5)


def test_attribution_patching_runs(fitted):
    assert fitted.patching_metric_ == "loss"
    assert -1.0 <= fitted.patching_rank_correlation_ <= 1.0
    assert fitted.activation_patching_.shape == fitted.mean_["attribution_patching"].shape


def test_attribution_patching_logit_diff(tiny_llama):
    meta = [{"answer": " Mary", "distractor": " John", "corrupt_prompt": "When Mary and John went to the store, Mary gave"},
            {"answer": " John", "distractor": " Mary", "corrupt_prompt": "When Mary and John went to the store, John gave"}]
    prompts = ["When Mary and John went to the store, John gave", "When Mary and John went to the store, Mary gave"]
    ioi = tiny_llama.tokenize(prompts, meta=meta)
    probe = HeadImportance(["attribution_patching"]).fit(model=tiny_llama, batch=ioi)
    assert probe.patching_metric_ == "logit_diff"
    assert -1.0 <= probe.patching_rank_correlation_ <= 1.0
    assert np.isfinite(probe.mean_["attribution_patching"]).all()


def test_pruning_curve(tiny_llama, batch, fitted):
    frame, figure = pruning_curve(tiny_llama, batch, order=("importance", "random"), step=0.25,
                                  importance=fitted.mean_["ablation_zero"])
    assert list(frame.columns) == ["fraction_removed", "heads_removed", "loss", "order"]
    assert set(frame["order"]) == {"importance", "random"}
    for _, curve in frame.groupby("order"):
        assert curve["heads_removed"].tolist() == [0, 2, 4, 6, 8]
        assert curve["loss"].iloc[0] == pytest.approx(float(ir.loss(tiny_llama, batch)), abs=1e-5)
    everything = InterventionSet([HI(layer, head, "zero") for layer in range(2) for head in range(4)])
    assert frame["loss"].iloc[-1] == pytest.approx(float(ir.loss(tiny_llama, batch, everything)), abs=1e-5)
    first = frame[(frame["order"] == "importance") & (frame["heads_removed"] == 2)]["loss"].item()
    order = np.argsort(fitted.mean_["ablation_zero"].ravel(), kind="stable")[:2]
    two = InterventionSet([HI(int(i) // 4, int(i) % 4, "zero") for i in order])
    assert first == pytest.approx(float(ir.loss(tiny_llama, batch, two)), abs=1e-5)
    assert len(figure.data) == 2
    again, _ = pruning_curve(tiny_llama, batch, order="random", step=0.25)
    assert np.allclose(again["loss"], frame[frame["order"] == "random"]["loss"])


def test_figures_and_registry(fitted, tiny_llama, batch):
    fig = fitted.figure("gradient")
    assert fig.data[0].z.shape == (tiny_llama.n_layers, tiny_llama.n_heads)
    assert set(fitted.figures()) == set(HeadImportance.metrics)
    assert PROBES["importance"] is HeadImportance
    probe = PROBES["importance"](["ablation_zero"], layers=[1]).fit(None, model=tiny_llama, batch=batch)
    assert probe.mean_["ablation_zero"].shape == (1, tiny_llama.n_heads)
    assert np.allclose(probe.mean_["ablation_zero"][0], fitted.mean_["ablation_zero"][1], atol=1e-6)


def test_bad_inputs(tiny_llama, tiny_bert, batch):
    with pytest.raises(InputError, match="unknown metric"):
        HeadImportance(["ablation_foo"]).fit(model=tiny_llama, batch=batch)
    with pytest.raises(InputError, match="patching_metric"):
        HeadImportance(patching_metric="kl").fit(model=tiny_llama, batch=batch)
    with pytest.raises(InputError, match="tokens_per_forward"):
        HeadImportance(tokens_per_forward=0).fit(model=tiny_llama, batch=batch)
    with pytest.raises(InputError, match="needs the batch"):
        HeadImportance().fit(model=tiny_llama)
    with pytest.raises(InputError, match="needs the model"):
        HeadImportance().fit(batch=batch)
    with pytest.raises(InputError, match="encoder"):
        HeadImportance().fit(model=tiny_bert, batch=tiny_bert.tokenize(["hello there"]))
    with pytest.raises(InputError, match="layer index 5"):
        HeadImportance(layers=[5]).fit(model=tiny_llama, batch=batch)
    with pytest.raises(InputError, match="answer"):
        HeadImportance(["attribution_patching"], patching_metric="logit_diff").fit(model=tiny_llama, batch=batch)
    with pytest.raises(InputError, match="2 or more tokens"):
        HeadImportance(["ablation_zero"]).fit(model=tiny_llama, batch=tiny_llama.batch_from_ids([torch.tensor([5])]))
    with pytest.raises(WorkbenchError, match="not fitted"):
        HeadImportance().figure("gradient")
    with pytest.raises(InputError, match="was not computed"):
        HeadImportance(["gradient"]).fit(model=tiny_llama, batch=batch).figure("ablation_zero")
    with pytest.raises(InputError, match="step"):
        pruning_curve(tiny_llama, batch, step=0)
    with pytest.raises(InputError, match="pruning order"):
        pruning_curve(tiny_llama, batch, order="largest")
    with pytest.raises(InputError, match="shape"):
        pruning_curve(tiny_llama, batch, importance=np.zeros((3, 3)))


@pytest.mark.smollm2
def test_attribution_patching_tracks_activation_patching_on_ioi(smollm2):
    from workbench.data import load_dataset

    ioi = load_dataset("ioi", smollm2, n=8)
    probe = HeadImportance(["attribution_patching"]).fit(model=smollm2, batch=ioi)
    print(f"SmolLM2 IOI: Spearman(attribution, activation patching) = {probe.patching_rank_correlation_:.3f} "
          f"over {smollm2.n_layers * smollm2.n_heads} heads, {probe.n_patching_samples_} samples")
    assert probe.patching_metric_ == "logit_diff"
    assert probe.n_patching_samples_ >= 4
    assert probe.patching_rank_correlation_ > 0
    frame = probe.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) == smollm2.n_layers * smollm2.n_heads
