"""App benchmark: the service call behind each page's main action, timed on one model.

For a short prompt (the Compare target: <= 64 tokens) and a long one (``--long-tokens``, default
4096, analysed in stats mode), each row times one app action exactly as its callback runs it
(:mod:`app.web.services`, jobs included), median over ``--repeats`` runs (the long analysis once:
it is minutes on a CPU):

- Model & prompt: ``start_analysis`` until the job is done (capture + every capture probe + the clean forward);
- Head map: ``headmap_figure`` of stats / entropy;
- Pattern viewer: the first map (pooled in stats mode), a zoom to an exact 128 x 128 tile, the whole row
  of the last token with its top keys;
- Intervene: the fast half of Compare (top-k, loss and target-token logits; the clean side cached
  per prompt), then the follow-up (KV-cache continuations + head scores) streamed after;
- reference for Compare, in the same run: the previous flow (``intervened_run.next_token_topk``,
  ``loss`` and ``generate`` for both sides, one after the other) - the ratio column is reference / new;
- Atlas: ``start_atlas`` (induction x 4, PCA); Runs: ``open_run`` + ``run_figure`` of a run written here.

Usage::

    python benchmarks/bench_app.py --model smollm2-135m --repeats 3 --long-tokens 4096
    python benchmarks/bench_app.py --model tiny-llama --long-tokens 512      # a quick smoke run

Prints a markdown table (seconds); the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHORT = "When Mary and John went to the store, John gave a drink to"


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run_job(ws, job_id: str, timeout: float = 3600.0):
    status = ws.jobs.wait(job_id, timeout)
    if status["state"] != "done":
        raise RuntimeError(f"job failed: {status}")
    return ws.jobs.result(job_id)


def long_prompt(model, n_tokens: int) -> str:
    """Bundled calibration text, repeated and cut to ``n_tokens`` tokens (decoded back to text)."""
    from workbench.data import load_dataset

    batch = load_dataset("calibration", model, n=8)
    ids = batch.tokens[batch.mask]
    while ids.numel() < n_tokens:
        ids = ids.repeat(2)
    text = model.tokenizer.decode(ids[: n_tokens - 1].tolist(), skip_special_tokens=True)
    while model.encode(text).numel() > n_tokens:  # re-tokenising may merge differently
        text = text[: int(len(text) * 0.98)]
    return text


def bench_prompt(ws, model, label: str, prompt: str, repeats: int, analysis_repeats: int, rows: list) -> None:
    from app.web.services import analysis as svc
    from app.web.services import headmap, intervene, patterns
    from workbench import intervened_run

    seconds, result = timed(lambda: run_job(ws, svc.start_analysis(ws, model.name, prompt)), analysis_repeats)
    key = result["key"]
    analysis = ws.analyses.get(key)
    n = analysis.n_tokens
    rows.append((label, n, "Model & prompt: analyse (capture, probes, clean forward)", seconds, None))
    seconds, _ = timed(lambda: headmap.headmap_figure(analysis, "stats|entropy", None), repeats)
    rows.append((label, n, "Head map: figure", seconds, None))
    seconds, _ = timed(lambda: patterns.pattern_view(analysis, 1, 0), repeats)
    rows.append((label, n, f"Pattern: first map ({analysis.mode} mode)", seconds, None))
    q0 = max(0, n - 128)
    seconds, _ = timed(lambda: patterns.pattern_view(analysis, 1, 0, (q0, n, q0, n)), repeats)
    rows.append((label, n, "Pattern: zoom to an exact tile", seconds, None))
    seconds, _ = timed(lambda: (patterns.row_view(analysis, 1, 0, n - 1),
                                patterns.top_keys(analysis, 1, 0, n - 1, patterns.ROW_TOPK)), repeats)
    rows.append((label, n, "Pattern: whole row + top keys", seconds, None))

    items = [intervene.make_item(1, 0, "zero")]
    target = None  # the clean top-1 token, when its text tokenizes back to one token
    if analysis.clean_last_logits is not None:
        text = model.tokenizer.decode([int(analysis.clean_last_logits.argmax())])
        if len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) == 1:
            target = text

    def fast():
        return run_job(ws, intervene.start_comparison(ws, analysis, items, key, target))["key"]

    seconds, comparison_key = timed(fast, repeats)
    followup, _ = timed(lambda: run_job(ws, intervene.start_followup(ws, comparison_key)), 1)
    spec = intervene.build_set(model, items)

    def reference():
        for interventions in (None, spec):
            intervened_run.next_token_topk(model, prompt, interventions, k=ws.limits.topk)
            intervened_run.loss(model, analysis.batch, interventions)
            intervened_run.generate(model, prompt, interventions, max_new_tokens=ws.limits.continuation_tokens)

    ref, _ = timed(reference, 1 if n > 512 else repeats)
    rows.append((label, n, "Intervene: Compare, top-k + loss + target logits", seconds, ref / seconds))
    rows.append((label, n, "Intervene: follow-up (continuations + head scores)", followup, None))
    rows.append((label, n, "Intervene: previous flow (reference, same run)", ref, None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-tokens", type=int, default=4096, help="0 skips the long prompt")
    args = parser.parse_args(argv)

    import pandas as pd

    from app.web.services import atlas as atlas_svc
    from app.web.services import runs
    from app.web.services.workspace import Workspace
    from workbench.model import load_model
    from workbench.runstore import write_run

    model = load_model(args.model)
    ws = Workspace(default_model=args.model)
    rows: list = []
    try:
        bench_prompt(ws, model, "short", SHORT, args.repeats, args.repeats, rows)
        seconds, _ = timed(lambda: run_job(ws, atlas_svc.start_atlas(ws, args.model, "induction", 4, "pca")), 1)
        rows.append(("dataset", None, "Atlas: embed heads (induction x 4, PCA)", seconds, None))
        with tempfile.TemporaryDirectory() as folder:
            table = pd.DataFrame([{"layer": layer, "head": head, "probe": "stats", "metric": "entropy",
                                   "value": float(layer + head), "ci_low": 0.0, "ci_high": 1.0}
                                  for layer in range(model.n_layers) for head in range(model.n_heads)])
            write_run(Path(folder) / "run", table, {"model": args.model, "dataset": "induction"})
            seconds, _ = timed(lambda: runs.run_figure(runs.open_run(Path(folder), "run"), "stats|entropy"),
                               args.repeats)
            rows.append(("run", None, "Runs: open + figure", seconds, None))
        if args.long_tokens:
            bench_prompt(ws, model, "long", long_prompt(model, args.long_tokens), args.repeats, 1, rows)
    finally:
        ws.jobs.shutdown()
    print(f"model {args.model}; median of {args.repeats} runs (long analysis and reference: 1 run); seconds\n")
    print("| input | tokens | action | s | reference / new |")
    print("|---|---:|---|---:|---:|")
    for label, n, action, seconds, ratio in rows:
        print(f"| {label} | {'' if n is None else n} | {action} | {seconds:.2f} | "
              f"{'' if ratio is None else f'{ratio:.1f}x'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
