"""Reference process: a plain transformers forward over the workbench's calibration input.

What one run of this process does (and so what ``/usr/bin/time -v`` around it measures):
start Python, import torch + transformers, load the model folder with
``AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=...)``,
tokenize the calibration text, run ONE forward under ``torch.inference_mode()`` with
``logits_to_keep=1``, print one short JSON line, exit. No warm-up, no repeats.

Modes:

- default: ``attn_implementation="sdpa"``, no attention weights returned (the cheapest plain
  forward; the reference of ``workbench analyze --mode stats``);
- ``--eager-attentions``: ``attn_implementation="eager"`` with ``output_attentions=True``, so the
  forward returns every layer's ``[1, H, N, N]`` fp32 pattern (the memory reference of a plain
  transformers process that hands back attention patterns; default 256 tokens).

Input: the same ids as ``workbench.load_dataset("calibration", model, n=1, seq_len=N)``, rebuilt
with the HF tokenizer alone (no workbench / TransformerLens import here), following
``workbench/data.py``: the non-empty paragraphs of ``calibration.txt`` (split on blank lines,
stripped) joined by ``"\\n\\n"``, tokenized without special tokens, cut into windows of ``N - 1``
ids, BOS prepended; the first full window is sample 0. When the text holds fewer than ``N - 1``
ids (SmolLM2: about 8.3k), its ids are repeated until they do (a dense forward costs the same for
any ids): the process always runs exactly ``N`` tokens, and refuses to run otherwise.

Usage::

    python benchmarks/sdpa_forward_process.py --folder ~/.cache/attention-workbench/models/smollm2-135m --seq-len 2048
    python benchmarks/sdpa_forward_process.py --folder ... --eager-attentions          # 256 tokens
    python benchmarks/sdpa_forward_process.py --folder ... --seq-len 512 --print-ids   # ids only, no model
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def calibration_ids(folder: Path, seq_len: int, text_file: Path) -> list[int]:
    """Sample 0 of the workbench's packed ``calibration`` dataset at ``seq_len`` (see module doc)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    paragraphs = [p.strip() for p in text_file.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    ids = tokenizer("\n\n".join(paragraphs), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id  # SmolLM2 is a decoder: the workbench prepends BOS
    body = seq_len - (bos is not None)
    if len(ids) < body:  # a length past the text: repeat it (cost does not depend on the ids)
        ids = ids * -(-body // len(ids))
    windows = [ids[i:i + body] for i in range(0, len(ids), body)]
    ids = ([bos] if bos is not None else []) + next(w for w in windows if len(w) == body)
    if len(ids) != seq_len:
        raise SystemExit(f"built {len(ids)} ids for --seq-len {seq_len}")
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True, help="the model's safetensors folder")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens (default 2048; 256 with --eager-attentions)")
    parser.add_argument("--eager-attentions", action="store_true",
                        help="eager attention with output_attentions=True (returns every pattern)")
    parser.add_argument("--text", type=Path, default=None,
                        help="calibration text (default: $WORKBENCH_DATASETS or datasets/ calibration.txt)")
    parser.add_argument("--print-ids", action="store_true", help="print the token ids as JSON and exit (no model)")
    args = parser.parse_args(argv)
    seq_len = args.seq_len or (256 if args.eager_attentions else 2048)
    text = args.text or Path(os.environ.get("WORKBENCH_DATASETS") or REPO / "datasets") / "calibration.txt"

    ids = calibration_ids(args.folder, seq_len, text)
    if args.print_ids:
        print(json.dumps(ids))
        return

    import torch
    from transformers import AutoModelForCausalLM

    attn = "eager" if args.eager_attentions else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(str(args.folder), dtype=torch.float32, attn_implementation=attn).eval()
    tokens = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=tokens, logits_to_keep=1, output_attentions=args.eager_attentions)
    forward_s = time.perf_counter() - start
    n_maps = len(out.attentions) if args.eager_attentions else 0
    print(json.dumps({"attn": attn, "tokens": tokens.shape[1], "forward_s": round(forward_s, 3),
                      "attention_maps": n_maps, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
