"""The batch CLI: outputs, and one clear line for each bad input with nothing left behind."""

import json

import pandas as pd
import pytest

from app.cli import main
from workbench.atomic import atomic_dir

COLUMNS = ["layer", "head", "probe", "metric", "value", "ci_low", "ci_high"]


def test_analyze_writes_the_run_folder(tmp_path, capsys, tiny_llama):
    out = tmp_path / "run"
    code = main(["analyze", "--model", "tiny-llama", "--dataset", "induction", "--n", "3",
                 "--probes", "stats,detectors", "--out", str(out), "--no-progress"])
    assert code == 0
    heads = pd.read_parquet(out / "heads.parquet")
    assert list(heads.columns) == COLUMNS
    assert len(heads) == 2 * 4 * (9 + 3)
    assert heads.groupby(["layer", "head", "metric"]).size().max() == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "tiny-llama" and manifest["dataset"] == "induction" and manifest["seed"] == 0
    assert {"torch", "transformer-lens"} <= set(manifest["versions"]) and "capture_s" in manifest["timings"]
    report = (out / "report.html").read_text()
    # self-contained: plotly.js inlined, nothing loaded from elsewhere
    assert "<script" in report and "<script src=" not in report and "<link" not in report
    assert "top induction heads" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_metric_subset(tmp_path, tiny_llama):
    out = tmp_path / "run"
    assert main(["analyze", "--model", "tiny-llama", "--dataset", "induction", "--n", "2", "--metrics",
                 "entropy,induction", "--out", str(out), "--no-progress", "--layers", "1"]) == 0
    heads = pd.read_parquet(out / "heads.parquet")
    assert set(heads["metric"]) == {"entropy", "induction"} and set(heads["layer"]) == {1}


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case,extra,message", [
    ("empty prompt", lambda d: ["--dataset", _write(d, "e.jsonl", '{"prompt": "  "}\n')], "empty prompt"),
    ("too long", lambda d: ["--dataset", _write(d, "long.jsonl", json.dumps({"prompt": "word " * 3000}) + "\n")],
     "longer than the limit"),
    ("layer out of range", lambda d: ["--layers", "0,9"], "layer index 9 out of range"),
    ("head out of range", lambda d: ["--heads", "4"], "head index 4 out of range"),
    ("unknown probe", lambda d: ["--probes", "stats,telepathy"], "unknown probe 'telepathy'"),
    ("unknown metric", lambda d: ["--metrics", "entropy,vibes"], "unknown metric 'vibes'"),
    ("empty dataset file", lambda d: ["--dataset", _write(d, "empty.txt", "\n\n")], "empty dataset"),
    ("unknown model", lambda d: ["--model", "gpt-17"], "unknown model 'gpt-17'"),
    ("unknown dataset", lambda d: ["--dataset", "no-such-set"], "unknown dataset"),
])
def test_bad_input_one_line_and_nothing_written(tmp_path, capsys, tiny_llama, case, extra, message):
    out = tmp_path / "out"
    args = ["analyze", "--model", "tiny-llama", "--dataset", "induction", "--n", "2", "--out", str(out),
            "--no-progress"] + extra(tmp_path)
    # later options win in argparse, so the case's --model/--dataset replace the defaults above
    assert main(args) == 2, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_interrupted_write_leaves_nothing(tmp_path):
    final = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "heads.parquet").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rewrite_keeps_the_old_result(tmp_path):
    final = tmp_path / "run"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("new, half")
            raise RuntimeError("killed")
    assert (final / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
