"""Experiment: does VHR (α = 2) raise the log-probability of the context-supported answer?

On the bundled ``context_qa`` set (invented passages, so the answer is only in the context)
with SmolLM2-135M, per item, teacher-forced on ``prompt + answer``:

- ``none``: no intervention;
- ``vhr``: the VHR selection of that item (t = 0, :func:`probes.vhr.vhr_select`) scaled by α;
- ``random``: the same number of heads in each of the same layers, drawn uniformly at random,
  scaled by α (``--draws`` draws per item, averaged per item);
- ``no_context``: the question alone (how much the context helps in the first place).

Metrics: log p of the first answer token and the summed log p over the answer tokens; top-1
accuracy of the first answer token. Intervals are 95% over items: Student-t, plus a
percentile bootstrap (10 000 resamples) for the paired differences.

    .venv/bin/python benchmarks/exp_vhr_context_qa.py --n 40 --draws 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from probes.base import mean_and_ci
from probes.vhd_inputs import prompts_from_batch
from probes.vhr import VHRSelection, paper_layers, vhr_select
from workbench.data import load_dataset
from workbench.interventions import HeadIntervention, InterventionSet
from workbench.intervened_run import forward
from workbench.model import load_model


def answer_logprobs(model, prompt_ids: torch.Tensor, answer_ids: torch.Tensor,
                    interventions: InterventionSet | None) -> tuple[float, float, bool]:
    """``(log p(first answer token), Σ log p(answer tokens), first token is the argmax)``."""
    ids = torch.cat([prompt_ids, answer_ids])
    logits = forward(model, model.batch_from_ids([ids]), interventions)[0].float()
    n = prompt_ids.numel()
    logp = torch.log_softmax(logits[n - 1:n - 1 + answer_ids.numel()], -1)
    per_token = logp.gather(1, answer_ids[:, None])[:, 0]
    return float(per_token[0]), float(per_token.sum()), bool(logits[n - 1].argmax() == answer_ids[0])


def random_like(selection: VHRSelection, n_heads: int, generator: torch.Generator) -> InterventionSet:
    """As many random heads per layer as the selection has, in the same layers, same α."""
    items = []
    for layer in selection.layers:
        count = len(selection.heads.get(layer, []))
        for head in torch.randperm(n_heads, generator=generator)[:count].tolist():
            items.append(HeadIntervention(layer, int(head), "scale", alpha=selection.alpha))
    return InterventionSet(items)


def bootstrap_ci(values: np.ndarray, *, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean over items."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=40, help="items of context_qa")
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--draws", type=int, default=3, help="random-head draws per item")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the per-item results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids thrashing on shared cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    batch = load_dataset("context_qa", model, n=args.n)
    prompts = prompts_from_batch(batch)
    generator = torch.Generator().manual_seed(args.seed)
    conditions = ("none", "vhr", "random", "no_context")
    rows = {c: {"first": [], "total": [], "top1": []} for c in conditions}
    n_selected, start = [], time.perf_counter()
    for index, (prompt, meta) in enumerate(zip(prompts, batch.meta)):
        answer = torch.tensor(model.tokenizer(meta["answer"], add_special_tokens=False)["input_ids"])
        selection = vhr_select(model, prompt, alpha=args.alpha)
        n_selected.append(selection.n_selected)
        results = {
            "none": answer_logprobs(model, prompt.ids, answer, None),
            "vhr": answer_logprobs(model, prompt.ids, answer, selection.interventions),
            "no_context": answer_logprobs(model, model.encode(meta["no_context_prompt"]), answer, None),
        }
        draws = [answer_logprobs(model, prompt.ids, answer, random_like(selection, model.n_heads, generator))
                 for _ in range(args.draws)]
        results["random"] = tuple(float(np.mean([d[i] for d in draws])) for i in range(3))
        for condition, (first, total, top1) in results.items():
            rows[condition]["first"].append(first)
            rows[condition]["total"].append(total)
            rows[condition]["top1"].append(float(top1))
        print(f"item {index + 1}/{len(prompts)}: {selection.n_selected} heads, "
              f"first-token log p none {results['none'][0]:.2f} vhr {results['vhr'][0]:.2f} "
              f"random {results['random'][0]:.2f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    report = summarize(rows, args, n_selected, model)
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": report, "per_item": rows}, indent=1))
    return report


def summarize(rows: dict, args, n_selected: list[int], model) -> dict:
    """Print the markdown table and return the numbers."""
    report = {"model": model.name, "n_items": len(rows["none"]["first"]), "alpha": args.alpha,
              "draws": args.draws, "layers": paper_layers(model.n_layers),
              "heads_selected_mean": float(np.mean(n_selected)), "rows": []}
    print(f"\nVHR on context_qa, {model.name}, {report['n_items']} items, alpha={args.alpha}, "
          f"layers {report['layers']}, {report['heads_selected_mean']:.1f} heads selected per item on average, "
          f"random baseline: {args.draws} draws per item\n")
    print("| quantity | mean | 95% CI (t) | 95% CI (bootstrap) |")
    print("|---|---|---|---|")
    for metric, label in (("first", "log p(first answer token)"), ("total", "Σ log p(answer tokens)"),
                          ("top1", "top-1 accuracy of first token")):
        for condition in ("none", "vhr", "random", "no_context"):
            values = np.asarray(rows[condition][metric])
            _line(report, f"{label}: {condition}", values, bootstrap=False)
        if metric == "top1":
            continue
        for a, b in (("vhr", "none"), ("random", "none"), ("vhr", "random")):
            diff = np.asarray(rows[a][metric]) - np.asarray(rows[b][metric])
            _line(report, f"{label}: {a} − {b}", diff, bootstrap=True)
    return report


def _line(report: dict, name: str, values: np.ndarray, *, bootstrap: bool) -> None:
    mean, low, high = mean_and_ci(torch.as_tensor(values)[:, None])
    boot = bootstrap_ci(values) if bootstrap else (float("nan"), float("nan"))
    report["rows"].append({"quantity": name, "mean": float(mean[0]), "t_low": float(low[0]),
                           "t_high": float(high[0]), "boot_low": boot[0], "boot_high": boot[1]})
    boot_text = f"[{boot[0]:.3f}, {boot[1]:.3f}]" if bootstrap else "—"
    print(f"| {name} | {mean[0]:.3f} | [{low[0]:.3f}, {high[0]:.3f}] | {boot_text} |")


if __name__ == "__main__":
    main()
