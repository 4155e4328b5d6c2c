"""Experiment: which SmolLM2-135M heads write the IOI answer, by DLA, patching and noising.

On the bundled ``ioi`` set (clean prompt, corrupted prompt with the second subject replaced by a
third name, answer = indirect object, distractor = subject):

- ``dla_diff``: direct logit attribution of each head to logit(IO) − logit(S) at the last
  token (probe ``attribution``), mean and 95 % Student-t interval over every usable item;
  plus the largest error of the decomposition identity (Σ components vs the model's value);
- ``patch``: activation patching of each head's ``z`` (all positions) from the clean into the
  corrupted run, normalised recovery with a 95 % bootstrap interval, on ``--n-patch`` pairs;
- ``noise``: the reverse (corrupted ``z`` into the clean run), the drop in logit difference —
  an ablation by resampling from the corrupted prompt — on the same pairs;
- ``attribution patching`` (probe ``importance``, existing) on the same pairs, and its
  Spearman rank correlation with the real patching effect (unnormalised, same units).

Prints a table of the heads ranked by ``dla_diff`` with every method's value and rank, the
Spearman correlations between methods, and writes the per-head table as JSON lines.

    .venv/bin/python benchmarks/exp_attribution_ioi.py --n-patch 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from probes.attribution import LogitAttribution
from probes.importance import HeadImportance
from workbench.data import load_dataset
from workbench.model import load_model
from workbench.patching import PatchingSetup, patch_table, patched_metrics, Patch, setup_from_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-patch", type=int, default=4, help="prompt pairs for the patching sweeps")
    parser.add_argument("--top", type=int, default=12, help="heads listed in the table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attribution_ioi.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model)
    full = load_dataset("ioi", model)
    setup_all = setup_from_batch(model, full)
    usable = full.select(setup_all.kept)
    print(f"model {model.name}; ioi items {len(full)}, usable (same token length, distinct first tokens) {len(usable)}")

    probe = LogitAttribution(["dla", "dla_diff"]).fit(model=model, batch=usable)
    print(f"DLA identity: max |sum of components - model value| = {probe.identity_error_:.2e} "
          f"over {len(usable)} items")
    dla = probe.mean_["dla_diff"]
    dla_lo, dla_hi = probe.ci_low_["dla_diff"], probe.ci_high_["dla_diff"]

    pairs = usable.select(slice(0, args.n_patch))
    setup = setup_from_batch(model, pairs)
    t0 = time.perf_counter()
    table = patch_table(model, setup, "z", progress=_progress("patching"))
    patch_s = time.perf_counter() - t0
    rec = table["recovery"].to_numpy().reshape(model.n_layers, model.n_heads)
    rec_lo = table["ci_low"].to_numpy().reshape(model.n_layers, model.n_heads)
    rec_hi = table["ci_high"].to_numpy().reshape(model.n_layers, model.n_heads)
    effect = (table["metric_patched"] - table["metric_corrupt"]).to_numpy().reshape(model.n_layers, model.n_heads)

    swapped = PatchingSetup(setup.corrupt, setup.clean, setup.metric, setup.metric_name, setup.kept, setup.labels)
    heads = [Patch("z", layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)]
    noised, _, _ = patched_metrics(model, swapped, heads, progress=_progress("noising"))
    # swapped run: the patched target is the clean prompt; the drop is measured from setup's clean value
    drop = (float(table["metric_clean"].iloc[0]) - noised.mean(-1).numpy()).reshape(model.n_layers, model.n_heads)

    imp = HeadImportance(["attribution_patching"], validate_patching=False).fit(model=model, batch=pairs)
    atp = imp.mean_["attribution_patching"]
    finite = np.isfinite(atp) & np.isfinite(effect)
    rho_atp = spearmanr(atp[finite].ravel(), effect[finite].ravel()).statistic

    print(f"patching on {len(setup.kept)} pairs: clean logit diff {table['metric_clean'].iloc[0]:.3f}, "
          f"corrupted {table['metric_corrupt'].iloc[0]:.3f}; {model.n_layers * model.n_heads} heads in {patch_s:.0f} s")
    print(f"Spearman(attribution patching estimate, real patching effect) over {int(finite.sum())} heads: "
          f"{rho_atp:.3f}")
    flat = {"dla_diff": dla.ravel(), "patch": rec.ravel(), "noise": drop.ravel(), "attr_patch": atp.ravel()}
    names = list(flat)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ok = np.isfinite(flat[a]) & np.isfinite(flat[b])
            print(f"Spearman({a}, {b}) = {spearmanr(flat[a][ok], flat[b][ok]).statistic:.3f}")
    ranks = {k: _rank(v) for k, v in flat.items()}
    order = np.argsort(-np.nan_to_num(dla.ravel(), nan=-np.inf))[:args.top]
    print()
    print("| head | dla_diff [95% CI] | rank | patching recovery [95% CI] | rank | noising drop | rank | attr. patching | rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for index in order:
        layer, head = divmod(int(index), model.n_heads)
        row = {"layer": layer, "head": head, "dla_diff": float(dla[layer, head]), "dla_lo": float(dla_lo[layer, head]),
               "dla_hi": float(dla_hi[layer, head]), "patch": float(rec[layer, head]),
               "patch_lo": float(rec_lo[layer, head]), "patch_hi": float(rec_hi[layer, head]),
               "noise": float(drop[layer, head]), "attr_patch": float(atp[layer, head]),
               **{f"rank_{k}": int(ranks[k][index]) for k in ranks}}
        rows.append(row)
        print(f"| L{layer}H{head} | {row['dla_diff']:.3f} [{row['dla_lo']:.3f}, {row['dla_hi']:.3f}] | "
              f"{row['rank_dla_diff']} | {row['patch']:.3f} [{row['patch_lo']:.3f}, {row['patch_hi']:.3f}] | "
              f"{row['rank_patch']} | {row['noise']:.3f} | {row['rank_noise']} | {row['attr_patch']:.3f} | "
              f"{row['rank_attr_patch']} |")
    for key in ("patch", "noise"):
        top = np.argsort(-np.nan_to_num(flat[key], nan=-np.inf))[:5]
        print(f"top 5 by {key}: " + ", ".join(f"L{i // model.n_heads}H{i % model.n_heads}={flat[key][i]:.3f}"
                                              for i in top))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for index in range(model.n_layers * model.n_heads):
            layer, head = divmod(index, model.n_heads)
            f.write(json.dumps({"layer": layer, "head": head, **{k: _f(v[index]) for k, v in flat.items()}}) + "\n")
    print(f"wrote {args.out}; total {time.perf_counter() - start:.0f} s")


def _progress(what: str):
    def report(done: int) -> None:
        print(f"  {what}: {done} heads done ({time.strftime('%H:%M:%S')})", flush=True)
    return report


def _rank(values: np.ndarray) -> np.ndarray:
    """1 = largest; NaN last."""
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")
    ranks = np.empty(len(values), dtype=int)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def _f(value) -> float | None:
    return None if not np.isfinite(value) else float(value)


if __name__ == "__main__":
    main()
