"""HeSS-guided vs uniform vs random block-sparse attention on SmolLM2 (docs/metrics.md §6).

Steps:
1. HeSS on ``--n-calibration`` samples: e1 = next-token CE on the bundled calibration text
   (``--hess-len`` tokens), e2 = CE on the second copy of repeated random sequences
   (``--hess-len`` + 1 tokens, seed 0).
2. Evaluation at ``--seq-len`` tokens, block ``--block-size``: held-out loss on
   ``load_dataset("heldout", ..., seq_len)`` windows, and copy accuracy (greedy next-token
   accuracy on the second copy, positions as in :func:`probes.hess.copy_positions`) on
   repeated random sequences of the same length (seed 1, so disjoint from the HeSS ones).
3. Dense (s = 0, equal to full attention) and, for each sparsity, the allocations with the
   same per-(layer, query block) total (:mod:`probes.sparsity`): ``uniform``, ``hess``,
   ``random`` (the HeSS weights permuted within each layer, ``--random-seeds`` permutations
   averaged) and optionally ``hess_e1`` / ``hess_e2`` (weights from one error only).
4. Diagnostics: per-layer HeSS concentration (max share, effective number of heads
   ``1/Σ p²``); how the e2 (copy) HeSS relates to the induction heads of the detectors probe
   (Spearman ρ over all heads; per-layer agreement of the top head); induction score, mean max
   attention weight and HeSS_e2 of the heads of layers 17, 18 and the three most concentrated
   layers; the blocks each head keeps in the last query block of those layers at s = 0.7.

Writes ``results.json``, ``table.csv``, ``hess_heads.csv`` and plotly HTML figures to ``--out``.
``--reuse`` keeps the HeSS table and the rows already measured there (add allocations later).

Usage (from the repo root; defaults = the run in ``docs/hess.md``)::

    PYTHONPATH=. python benchmarks/exp_hess_sparsity.py
    PYTHONPATH=. python benchmarks/exp_hess_sparsity.py --reuse --allocations hess_e1,hess_e2 --sparsities 0.5,0.7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from probes.figures import curves, head_heatmap
from probes.hess import HeSS, copy_positions
from probes.sparsity import allocation_weights, block_budgets, visible_blocks
from workbench.data import load_dataset
from workbench.model import load_model, next_token_loss
from workbench.sparse_run import sparse_forward

SPARSITIES = (0.5, 0.7, 0.9)


def evaluate(model, heldout, copy, budgets_fn, block_size: int) -> dict:
    """Held-out loss, copy loss/accuracy and achieved sparsity with budgets from ``budgets_fn(n_tokens)``."""
    losses, achieved = [], []
    for i in range(len(heldout)):
        item = heldout.select([i])
        run = sparse_forward(model, item, budgets_fn(item.tokens.shape[1]), block_size=block_size)
        losses.append(float(next_token_loss(run.logits, item)))
        achieved.append(run.achieved_sparsity)
    correct, count, copy_losses = 0, 0, []
    for i in range(len(copy)):
        item = copy.select([i])
        run = sparse_forward(model, item, budgets_fn(item.tokens.shape[1]), block_size=block_size)
        where = copy_positions(item)[0]
        logits, targets = run.logits[0, :-1][where], item.tokens[0, 1:][where]
        correct += int((logits.argmax(-1) == targets).sum())
        count += int(where.sum())
        copy_losses.append(float(torch.nn.functional.cross_entropy(logits.float(), targets)))
        achieved.append(run.achieved_sparsity)
    return {"heldout_loss": float(np.mean(losses)), "heldout_loss_per_window": losses,
            "copy_accuracy": correct / count, "copy_loss": float(np.mean(copy_losses)),
            "achieved_sparsity": float(np.mean(achieved))}


def concentration(hess: np.ndarray) -> pd.DataFrame:
    """Per layer: max share, effective number of heads 1/Σp², entropy / log H."""
    p = hess / hess.sum(1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(1) / np.log(p.shape[1])
    return pd.DataFrame({"layer": np.arange(len(p)), "max_share": p.max(1), "top_head": p.argmax(1),
                         "effective_heads": 1.0 / (p ** 2).sum(1), "normalized_entropy": entropy})


def induction_comparison(model, hess_e2: np.ndarray) -> dict:
    """Detectors' induction scores vs copy-error HeSS."""
    from probes.detectors import Detectors
    from workbench.capture import capture

    batch = load_dataset("induction", model, n=8)
    cap = capture(model, batch, progress=False)
    induction = Detectors(["induction"]).fit(cap).mean_["induction"]
    rho = spearmanr(induction.ravel(), hess_e2.ravel())
    top_ind = induction.argmax(1)
    top_hess = hess_e2.argmax(1)
    flat = np.argsort(induction.ravel())[::-1][:10]
    top10 = [(int(i // induction.shape[1]), int(i % induction.shape[1]), float(induction.ravel()[i]),
              float(hess_e2.ravel()[i]), int((hess_e2[i // induction.shape[1]] > hess_e2.ravel()[i]).sum()) + 1)
             for i in flat]
    return {"spearman_induction_vs_hess_e2": float(rho.statistic), "spearman_p": float(rho.pvalue),
            "layers_where_top_head_agrees": int((top_ind == top_hess).sum()),
            "top10_induction_heads": [dict(layer=a, head=b, induction=c, hess_e2=d, hess_e2_rank_in_layer=e)
                                      for a, b, c, d, e in top10],
            "induction": induction.tolist()}


def saturation_table(model, hess_e2: np.ndarray, induction: np.ndarray, layers: list[int]) -> pd.DataFrame:
    """For the given layers: induction score, mean max attention weight on the induction set, HeSS_e2."""
    from probes.pattern_stats import PatternStats
    from workbench.capture import capture

    cap = capture(model, load_dataset("induction", model, n=8), layers=layers, progress=False)
    max_weight = PatternStats(["max_weight"]).fit(cap).mean_["max_weight"]
    rows = [dict(layer=layer, head=head, induction=induction[layer, head], max_weight=max_weight[i, head],
                 hess_e2=hess_e2[layer, head]) for i, layer in enumerate(layers) for head in range(model.n_heads)]
    return pd.DataFrame(rows)


def allocation_snapshot(weights: dict[str, np.ndarray], layers: list[int], sparsity: float, n_tokens: int,
                        block_size: int) -> pd.DataFrame:
    """Blocks kept per head in the last query block of ``layers`` for each allocation."""
    rows = []
    for name, w in weights.items():
        budgets = block_budgets(w, sparsity, n_tokens, block_size=block_size)[:, :, -1]
        rows += [dict(allocation=name, layer=layer, **{f"h{h}": int(budgets[layer, h]) for h in range(w.shape[1])})
                 for layer in layers]
    return pd.DataFrame(rows)


def write_figures(frame: pd.DataFrame, table: pd.DataFrame, out: Path, args) -> None:
    for metric in ("hess", "hess_e1", "hess_e2"):
        head_heatmap(frame, metric, title=f"{metric} ({args.model})").write_html(
            out / f"heatmap_{metric}.html", include_plotlyjs=True)
    dense = table[table["allocation"] == "dense"].iloc[0]
    sparse = table[table["allocation"] != "dense"]
    for column, label in (("heldout_loss", "held-out loss"), ("copy_accuracy", "copy accuracy")):
        series = {kind: ([0.0] + part["sparsity"].tolist(), [float(dense[column])] + part[column].tolist())
                  for kind, part in sparse.groupby("allocation", sort=False)}
        curves(series, title=f"{label} vs block sparsity (B={args.block_size}, N={args.seq_len})",
               x_title="fraction of key blocks dropped (nominal)", y_title=label).write_html(
            out / f"curve_{column}.html", include_plotlyjs=True)


def table_from_frame(frame: pd.DataFrame, metric: str) -> np.ndarray:
    rows = frame[frame["metric"] == metric]
    return rows.pivot_table(index="layer", columns="head", values="value").to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--n-heldout", type=int, default=3)
    parser.add_argument("--n-copy", type=int, default=3)
    parser.add_argument("--n-calibration", type=int, default=8)
    parser.add_argument("--hess-len", type=int, default=256)
    parser.add_argument("--random-seeds", type=int, default=1)
    parser.add_argument("--allocations", default="uniform,random,hess",
                        help="any of uniform, random, hess, hess_e1, hess_e2 (weights from that HeSS table)")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse hess_heads.csv and the rows already in results.json from --out")
    parser.add_argument("--out", default="benchmarks/results/hess_sparsity")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    previous = json.loads((out / "results.json").read_text()) if args.reuse else {}
    timings = dict(previous.get("timings", {}))
    model = load_model(args.model)

    if args.reuse:
        frame = pd.read_csv(out / "hess_heads.csv")
    else:
        start = time.perf_counter()
        probe = HeSS(n_calibration=args.n_calibration, seq_len=args.hess_len,
                     copy_seq_len=args.hess_len + 1).fit(model=model)
        timings["hess_s"] = time.perf_counter() - start
        frame = probe.to_frame()
        frame.to_csv(out / "hess_heads.csv", index=False)
        print(f"HeSS done in {timings['hess_s']:.1f}s", flush=True)
    tables = {m: table_from_frame(frame, m) for m in ("hess", "hess_e1", "hess_e2")}

    heldout = load_dataset("heldout", model, n=args.n_heldout, seq_len=args.seq_len)
    copy = load_dataset("induction", model, n=args.n_copy, seq_len=args.seq_len, seed=1)
    rows = list(previous.get("table", []))
    done = {(r["allocation"], r["sparsity"]) for r in rows}
    start = time.perf_counter()
    if ("dense", 0.0) not in done:
        dense = evaluate(model, heldout, copy, lambda n: block_budgets(
            np.ones_like(tables["hess"]), 0.0, n, block_size=args.block_size), args.block_size)
        rows.append(dict(allocation="dense", sparsity=0.0, **dense))
        print("dense", {k: v for k, v in dense.items() if k != "heldout_loss_per_window"}, flush=True)
    for sparsity in (float(x) for x in args.sparsities.split(",")):
        for name in args.allocations.split(","):
            if (name, sparsity) in done:
                continue
            kind = "hess" if name.startswith("hess") else name
            source = tables[name if name.startswith("hess") else "hess"]
            seeds = range(args.random_seeds) if kind == "random" else [0]
            results = [evaluate(model, heldout, copy,
                                lambda n, w=allocation_weights(kind, source, seed=seed): block_budgets(
                                    w, sparsity, n, block_size=args.block_size), args.block_size)
                       for seed in seeds]
            merged = {k: float(np.mean([r[k] for r in results])) for k in results[0] if k != "heldout_loss_per_window"}
            merged["heldout_loss_per_window"] = list(np.mean([r["heldout_loss_per_window"] for r in results], 0))
            rows.append(dict(allocation=name, sparsity=sparsity, **merged))
            print(name, sparsity, {k: round(v, 4) for k, v in merged.items() if k != "heldout_loss_per_window"},
                  flush=True)
    timings["eval_s"] = timings.get("eval_s", 0.0) + time.perf_counter() - start

    table = pd.DataFrame(rows).sort_values(["sparsity", "allocation"], kind="stable")
    table.drop(columns=["heldout_loss_per_window"]).to_csv(out / "table.csv", index=False)
    conc = {name: concentration(tables[name]) for name in tables}
    start = time.perf_counter()
    induction = induction_comparison(model, tables["hess_e2"])
    concentrated = sorted(np.argsort(conc["hess_e2"]["max_share"].to_numpy())[::-1][:3].tolist())
    saturation = saturation_table(model, tables["hess_e2"], np.asarray(induction["induction"]),
                                  sorted({17, 18} | set(concentrated)))
    snapshot_weights = {"uniform": allocation_weights("uniform", tables["hess"]),
                        "hess": allocation_weights("hess", tables["hess"]),
                        "hess_e2": allocation_weights("hess", tables["hess_e2"])}
    snapshot = allocation_snapshot(snapshot_weights, concentrated, 0.7, args.seq_len, args.block_size)
    timings["diagnostics_s"] = time.perf_counter() - start
    e1_e2 = spearmanr(tables["hess_e1"].ravel(), tables["hess_e2"].ravel()).statistic
    results = {
        "config": vars(args), "visible_blocks_last_query_block": int(visible_blocks(args.seq_len, args.block_size)[-1]),
        "timings": {k: round(v, 1) for k, v in timings.items()}, "table": rows,
        "concentration": {k: v.to_dict(orient="list") for k, v in conc.items()},
        "spearman_hess_e1_vs_e2": float(e1_e2), "induction": induction,
        "saturation": saturation.to_dict(orient="records"), "allocation_snapshot_s0.7": snapshot.to_dict(orient="records"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_figures(frame, table, out, args)
    pd.set_option("display.width", 200)
    print(table.drop(columns=["heldout_loss_per_window"]).to_string(index=False))
    print(json.dumps({k: results[k] for k in ("timings", "spearman_hess_e1_vs_e2")}))
    print(json.dumps({k: v for k, v in induction.items() if k != "induction"}, indent=1))
    print(saturation.round(3).to_string(index=False))
    print(snapshot.to_string(index=False))
    for name, part in conc.items():
        print(name, part.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
