"""Never lose a result, never run planted code, never leave a stale process-wide setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch

from app.cli import main
from kernels import cpu_fused
from kernels.parallel import run_blocks
from workbench import atomic
from workbench.errors import InputError
from workbench.runstore import is_listable, read_run, write_run

HEADS = pd.DataFrame({"layer": [0], "head": [0], "probe": ["stats"], "metric": ["entropy"], "value": [1.0],
                      "ci_low": [0.5], "ci_high": [1.5]})


def _no_model(monkeypatch):
    import workbench.model

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(workbench.model, "load_model", no_load)


# ------------------------------------------------------------------ --out never destroys
def test_out_on_a_folder_that_is_not_a_run_is_refused(tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "thesis.txt").write_text("x")
    assert main(["analyze", "--model", "tiny-llama", "--out", str(victim), "--no-progress"]) == 2
    assert "not a workbench run" in capsys.readouterr().err
    assert (victim / "thesis.txt").read_text() == "x" and (victim / "sub").is_dir()
    (tmp_path / "file").write_text("keep")
    assert main(["analyze", "--model", "tiny-llama", "--out", str(tmp_path / "file"), "--no-progress"]) == 2
    assert (tmp_path / "file").read_text() == "keep"


def test_out_holding_the_working_folder_is_refused(tmp_path, monkeypatch, capsys):
    _no_model(monkeypatch)
    sub = tmp_path / "sub"
    sub.mkdir()
    write_run(sub, HEADS, {"model": "m"})
    monkeypatch.chdir(sub)
    for out in (".", "../sub"):
        assert main(["analyze", "--model", "tiny-llama", "--out", out, "--force", "--no-progress"]) == 2
        assert "working in" in capsys.readouterr().err
    assert read_run(sub).manifest == {"model": "m"}


def test_an_existing_run_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "run"
    write_run(out, HEADS, {"version": 1})
    with pytest.raises(InputError, match="--force"):
        write_run(out, HEADS, {"version": 2})
    assert read_run(out).manifest == {"version": 1}
    write_run(out, HEADS, {"version": 2}, force=True)
    assert read_run(out).manifest == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left beside it


# ------------------------------------------------------------------ a kill never loses the old result
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("step", ["before the swap", "between the renames"])
def test_a_kill_during_the_write_keeps_the_old_result(tmp_path, monkeypatch, step):
    """A kill injected at each step of the write: the old run stays reachable at its path (the
    fallback's moved-aside copy is put back by the next write), and no leftover survives."""
    out = tmp_path / "run"
    write_run(out, HEADS, {"version": 1})
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # force the two-rename fallback
    real_replace = os.replace
    calls = {"n": 0}

    def killed(src, dst):
        calls["n"] += 1
        if step == "before the swap" or calls["n"] == 2:
            raise KeyboardInterrupt  # the process dies here
        return real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_run(out, HEADS, {"version": 2}, force=True)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert out.is_dir()  # an interrupt (not a kill) between the renames puts the old run back on the way out
    assert read_run(out).manifest == {"version": 1}
    write_run(out, HEADS, {"version": 3}, force=True)
    assert read_run(out).manifest == {"version": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_exchange_swaps_in_one_step_where_the_system_can(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    if not atomic.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system")
    assert (b / "x").read_text() == "new" and (a / "x").read_text() == "old"


# ------------------------------------------------------------------ no planted library is loaded
def test_the_kernel_cache_is_private_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    folder = cpu_fused._cache_dir()
    assert folder == tmp_path / "home" / "kernels" and (folder.stat().st_mode & 0o777) == 0o700
    cc = cpu_fused._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    library = cpu_fused._build(cc)
    cpu_fused._check_private(library)
    os.chown(library, 65534, 65534)  # now someone else's file at the expected path
    with pytest.raises(cpu_fused.UnsafeCacheError, match="not owned by you"):
        cpu_fused._build(cc)
    library.unlink()
    os.chmod(folder, 0o777)  # a folder others may write into
    with pytest.raises(cpu_fused.UnsafeCacheError):
        cpu_fused._build(cc)
    cpu_fused.tile_stats.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="torch ops"):
            assert cpu_fused.tile_stats() is None
    finally:
        cpu_fused.tile_stats.cache_clear()


# ------------------------------------------------------------------ thread settings
def test_concurrent_kernel_pools_restore_the_thread_count():
    before = torch.get_num_threads()
    errors = []

    def job():
        try:
            run_blocks(lambda item: time.sleep(0.01 * item), [3, 1, 2, 1], workers=2)
        except Exception as err:  # surfaced below
            errors.append(err)
    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and torch.get_num_threads() == before


# ------------------------------------------------------------------ a kill at every step of the write
_KILL_CHILD = r"""
import os, signal, sys
from pathlib import Path
import pandas as pd
import pyarrow.parquet  # imported once here, not in every forked writer
from workbench import atomic
from workbench.runstore import write_run

HEADS = pd.DataFrame({"layer": [0], "head": [0], "probe": ["stats"], "metric": ["entropy"], "value": [1.0],
                      "ci_low": [0.5], "ci_high": [1.5]})


def write(out, version, kill_at, fallback):
    count = [0]

    def step(fn):
        def wrapped(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # the process dies before this step runs
            return fn(*args, **kwargs)
        return wrapped
    for name in ("replace", "rename", "mkdir", "chmod", "unlink", "rmdir"):
        setattr(os, name, step(getattr(os, name)))
    if fallback:
        atomic.exchange = lambda a, b: False
    atomic.exchange = step(atomic.exchange)
    pd.DataFrame.to_parquet = step(pd.DataFrame.to_parquet)
    Path.write_text = step(Path.write_text)
    write_run(out, HEADS, {"version": version}, force=True)
    return count[0]


for line in sys.stdin:
    out, version, kill_at, fallback = line.split()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        steps = write(Path(out), int(version), int(kill_at), fallback == "1")
        os.write(write_end, str(steps).encode())
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    steps = os.read(read_end, 64).decode() or "-1"
    os.close(read_end)
    print(pid, int(os.WIFSIGNALED(status)), steps, flush=True)
"""


def test_a_kill_at_every_step_of_the_write_loses_no_result(tmp_path):
    """50 writes over an existing run, each killed (SIGKILL) right before one of its file-system
    steps, with the one-step swap and with the two-rename fallback: the run at the path is always
    a complete one (the old or the new), and the next write leaves nothing beside it."""
    out = tmp_path / "run"
    write_run(out, HEADS, {"version": 0})
    child = subprocess.Popen([sys.executable, "-c", _KILL_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    version, trials, gaps, kills = 0, 0, 0, 0

    def write(kill_at: int, fallback: bool) -> tuple[bool, int]:
        nonlocal version
        version += 1
        child.stdin.write(f"{out} {version} {kill_at} {int(fallback)}\n")
        child.stdin.flush()
        _, killed, steps = child.stdout.readline().split()
        return killed == "1", int(steps)
    try:
        steps = {}
        for fallback in (False, True):
            killed, steps[fallback] = write(0, fallback)  # count the steps of a full write
            assert not killed and read_run(out).manifest == {"version": version}
        while trials < 50:
            for fallback in (False, True):
                for kill_at in range(1, steps[fallback] + 1):
                    if trials == 50:
                        break
                    before = read_run(out).manifest["version"]
                    killed, _ = write(kill_at, fallback)
                    assert killed
                    kills += 1
                    gaps += not out.exists()  # killed between the fallback's two renames
                    assert read_run(out).manifest["version"] in (before, version)  # complete, old or new
                    trials += 1
    finally:
        child.stdin.close()
        child.wait(30)
    assert kills == 50 and gaps >= 1  # the instant between the renames was hit and recovered
    write_run(out, HEADS, {"version": "last"}, force=True)
    assert read_run(out).manifest == {"version": "last"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_leftovers_of_dead_writers_are_cleaned_by_the_next_write(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "kept", HEADS, {"version": 1})
    dead = _dead_pid()
    (runs / f".tmp-other-{dead}-abc_1234").mkdir()           # a killed write of another run
    (runs / f".tmp-other-{dead}-abc_1234" / "heads.parquet").write_text("half")
    (runs / "kept").rename(runs / f".old-kept-{dead}")        # killed between the renames
    alive = f".tmp-alive-{os.getpid()}-xyz_1234"
    (runs / alive).mkdir()                                    # a write in progress: left alone
    (runs / f".tmp-notes-{dead}").write_text("not ours")      # not a name the workbench writes
    write_run(runs / "new", HEADS, {"version": 2})
    assert sorted(p.name for p in runs.iterdir()) == sorted(["kept", "new", alive, f".tmp-notes-{dead}"])
    assert read_run(runs / "kept").manifest == {"version": 1}
    assert not is_listable(runs / alive) and not is_listable(runs / ".old-x-1")
    assert is_listable(runs / "kept")


def test_stale_pull_scratch_folders_are_removed(tmp_path):
    from workbench.pull import SCRATCH_PREFIX, clean_stale_scratch

    dead, alive = tmp_path / f"{SCRATCH_PREFIX}{_dead_pid()}-abc", tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-def"
    for folder in (dead, alive):
        (folder / "wheel").mkdir(parents=True)
        (folder / "wheel" / "big.whl").write_text("x")
    assert clean_stale_scratch(tmp_path) == [dead]
    assert not dead.exists() and alive.exists()


# ------------------------------------------------------------------ item 0: silent wrong results
@pytest.mark.parametrize("text, message", [
    ("L1H0:scale", "needs its factor"),
    ("L1H0:scale=2;alpha=3", "given twice"),
    ("L1H0:zero;alpha=5", "takes no options"),
    ("L1H0:softpag=0.5;keep=0.3", "takes only u"),
])
def test_ambiguous_intervention_text_is_refused(text, message):
    from workbench.interventions import parse_interventions

    with pytest.raises(InputError, match=message):
        parse_interventions(text)


def test_resample_ablation_of_one_sample_is_refused(tiny_llama):
    from probes.importance import HeadImportance

    batch = tiny_llama.tokenize(["one single prompt here"])
    with pytest.raises(InputError, match=">= 2 samples"):
        HeadImportance(["ablation_resample"]).fit(model=tiny_llama, batch=batch)


def test_intervals_of_bounded_metrics_stay_inside_their_bounds():
    from probes.base import mean_and_ci

    near_one = torch.tensor([1.0, 1.0, 0.7, 1.0, 0.98])[:, None]
    mean, low, high = mean_and_ci(near_one)
    assert high[0] > 1  # the plain t interval crosses the bound
    mean_b, low_b, high_b = mean_and_ci(near_one, bounds=(0.0, 1.0))
    assert mean_b[0] == pytest.approx(mean[0]) and 0 <= low_b[0] < mean_b[0] < high_b[0] <= 1
    positive = torch.tensor([0.01, 0.02, 0.5])[:, None]
    assert mean_and_ci(positive)[1][0] < 0 and mean_and_ci(positive, bounds=(0.0, float("inf")))[1][0] > 0
    on_bound = torch.zeros(4, 1)
    assert [float(v[0]) for v in mean_and_ci(on_bound, bounds=(0.0, 1.0))] == [0.0, 0.0, 0.0]


def test_probe_tables_respect_the_bounds_they_declare(tiny_llama):
    from probes.pipeline import analyze

    prompts = ["The cat sat on the mat.", "A a a a a a a a", "Hello world, hello world.", "x y z"]
    table = analyze(tiny_llama, prompts, probes="stats,detectors,sinks", progress=False).table
    from probes.registry import PROBES

    checked = 0
    for name in ("stats", "detectors", "sinks"):
        for metric, (low, high) in PROBES[name].bounds.items():
            rows = table[(table["probe"] == name) & (table["metric"] == metric)].dropna()
            assert (rows["ci_low"] >= low - 1e-9).all() and (rows["ci_high"] <= high + 1e-9).all(), metric
            checked += len(rows)
    assert checked > 0


def _model_copy(tmp_path, name, change=None, drop=()):
    """A copy of the cached tiny-llama folder with its weights changed / files dropped."""
    import shutil

    from safetensors.torch import load_file, save_file

    from workbench.pull import cached_folder
    from workbench.registry import REGISTRY

    folder = tmp_path / name
    shutil.copytree(cached_folder(REGISTRY["tiny-llama"]), folder)
    (folder / "workbench-model.json").unlink()
    for file in drop:
        (folder / file).unlink()
    if change is not None:
        weights = load_file(folder / "model.safetensors")
        change(weights)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_folder_without_tokenizer_files_is_refused(tmp_path, tiny_llama):
    from workbench.errors import CorruptModelError
    from workbench.model import load_model

    folder = _model_copy(tmp_path, "notok", drop=("tokenizer.json", "tokenizer_config.json"))
    with pytest.raises(CorruptModelError, match="no tokenizer files"):
        load_model(folder)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_llama):
    from types import SimpleNamespace

    from workbench.errors import CorruptModelError
    from workbench.model import check_tokenizer

    bridge = SimpleNamespace(tokenizer=tiny_llama.tokenizer, cfg=SimpleNamespace(d_vocab=len(tiny_llama.tokenizer) - 1))
    with pytest.raises(CorruptModelError, match="embeds only"):
        check_tokenizer(bridge, tiny_llama.folder)


# ------------------------------------------------------------------ item 4: model cache and app access
def test_models_are_cached_by_resolved_path_and_bounded(tmp_path, monkeypatch, tiny_llama):
    from collections import OrderedDict

    import workbench.model as model_module

    monkeypatch.setattr(model_module, "_LOADED", OrderedDict())
    folder = tiny_llama.folder
    same = [model_module.load_model(str(folder)), model_module.load_model("/" + str(folder)),
            model_module.load_model(str(folder.parent / "." / folder.name))]
    assert same[0] is same[1] is same[2] and len(model_module._LOADED) == 1
    model_module.set_model_cache_size(2)
    try:
        model_module.load_model("tiny-gpt2")
        model_module.load_model(str(folder))           # most recently used now
        model_module.load_model("tiny-bert")           # drops tiny-gpt2, the least recently used
        names = [key[0] for key in model_module._LOADED]
        assert len(names) == 2 and "tiny-gpt2" not in names and str(folder) in names
    finally:
        model_module.set_model_cache_size(None)


def test_the_app_loads_only_allowed_models(tmp_path):
    from app.web.services.workspace import Workspace

    root = tmp_path / "models"
    (root / "mine").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    ws = Workspace(default_model="tiny-llama", models_root=root)
    assert ws.check_model("tiny-gpt2") == "tiny-gpt2" and ws.check_model("tiny-llama") == "tiny-llama"
    assert ws.check_model(str(root / "mine")) == str((root / "mine").resolve()) == ws.check_model("mine")
    for bad in ("/etc", str(root / ".." / "elsewhere"), str(root / "escape"), "org/some-model", str(root)):
        with pytest.raises(InputError, match="not allowed here"):
            ws.check_model(bad)
    with pytest.raises(InputError, match="without --models-root"):
        Workspace(default_model="tiny-llama").check_model(str(root / "mine"))
    assert Workspace(allow_any_model=True).check_model("/etc") == "/etc"


# ------------------------------------------------------------------ item 6: broken checkpoints
@pytest.mark.parametrize("case, message", [("nan", "NaN/inf"), ("zeros", "all zeros"), ("empty", "no tensors")])
@pytest.mark.parametrize("mode", ["stats", "patterns"])
def test_a_broken_checkpoint_fails_with_one_line(tmp_path, capsys, case, message, mode):
    def nan(weights):
        key = next(k for k in weights if "q_proj" in k)
        weights[key][0, 0] = float("nan")

    def zeros(weights):
        for key in weights:
            weights[key] = torch.zeros_like(weights[key])

    def empty(weights):
        weights.clear()
    folder = _model_copy(tmp_path, case, {"nan": nan, "zeros": zeros, "empty": empty}[case])
    code = main(["analyze", "--model", str(folder), "--n", "2", "--mode", mode, "--out", str(tmp_path / "out"),
                 "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ item 7: numbers
@pytest.mark.parametrize("value", ["-1", "0"])
def test_batch_size_must_be_positive(tmp_path, monkeypatch, capsys, value):
    _no_model(monkeypatch)
    assert main(["analyze", "--model", "tiny-llama", "--batch-size", value, "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    assert "--batch-size must be a positive integer" in capsys.readouterr().err


def test_capture_batch_size_is_checked(tiny_llama):
    from workbench.capture import capture

    for bad in (-1, 0):
        with pytest.raises(InputError, match="batch_size"):
            capture(tiny_llama, ["hello world"], batch_size=bad, progress=False)


# ------------------------------------------------------------------ item 8: one clear line, never a traceback
def test_binary_and_mistyped_datasets_give_one_line(tmp_path, tiny_llama):
    import json

    from workbench.data import load_dataset

    for suffix in (".txt", ".jsonl"):
        binary = tmp_path / f"binary{suffix}"
        binary.write_bytes(b"\xff\xfe\x00\x81 not text")
        with pytest.raises(InputError, match="not UTF-8 text"):
            load_dataset(str(binary), tiny_llama)
    typed = tmp_path / "typed.jsonl"
    typed.write_text(json.dumps({"context": 5, "question": ["x"]}) + "\n")
    with pytest.raises(InputError, match="field 'context' must be a string"):
        load_dataset(str(typed), tiny_llama)


def test_jsonl_prompts_are_truncated_by_seq_len(tmp_path, tiny_llama):
    import json

    from workbench.data import load_dataset

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * (tiny_llama.n_ctx + 50)}) + "\n")
    with pytest.raises(InputError, match="--seq-len"):
        load_dataset(str(long), tiny_llama)
    assert load_dataset(str(long), tiny_llama, seq_len=16).tokens.shape == (1, 16)


@pytest.mark.parametrize("tokens, mask, message", [
    ([[1, 10_000_000]], [[1, 1]], "outside the model's vocabulary"),
    ([[1, -3]], [[1, 1]], "outside the model's vocabulary"),
    ([[1, 2, 3], [0, 0, 0]], [[1, 1, 1], [0, 0, 0]], "no real token"),
    ([[1, 2, 3], [0, 5, 6]], [[1, 1, 1], [0, 1, 1]], "no real token"),
    ([[1, 2, 3]], [[1, 0, 1]], "gap"),
])
def test_bad_token_batches_give_one_line(tiny_llama, tokens, mask, message):
    from workbench.batch import TokenBatch
    from workbench.capture import capture

    batch = TokenBatch(torch.tensor(tokens), torch.tensor(mask).bool())
    with pytest.raises(InputError, match=message):
        tiny_llama.run(batch)
    with pytest.raises(InputError, match=message):
        capture(tiny_llama, batch, progress=False)


def test_an_empty_token_batch_gives_one_line(tiny_llama):
    from workbench.batch import TokenBatch

    with pytest.raises(InputError, match="empty"):
        tiny_llama.run(TokenBatch(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.bool)))


def test_a_non_numeric_intervention_value_gives_one_line():
    from workbench.interventions import HeadIntervention

    with pytest.raises(InputError, match="alpha='x' is not a number"):
        HeadIntervention(1, 0, "scale", alpha="x")


# ------------------------------------------------------------------ item 9: run folders are validated on read
@pytest.mark.parametrize("manifest, message", [("[1, 2]", "JSON list"), ('"text"', "JSON str"),
                                               ('{"model": 5}', "field 'model'")])
def test_a_manifest_of_the_wrong_shape_is_refused(tmp_path, manifest, message):
    out = tmp_path / "run"
    write_run(out, HEADS, {"model": "m"})
    (out / "manifest.json").write_text(manifest)
    with pytest.raises(InputError, match=message):
        read_run(out)


def test_a_head_table_of_the_wrong_types_is_refused(tmp_path):
    out = tmp_path / "run"
    write_run(out, HEADS.assign(value=["high"]), {"model": "m"})
    with pytest.raises(InputError, match="column 'value' must hold numbers"):
        read_run(out)


# ------------------------------------------------------------------ item 10: Ctrl+C
def test_ctrl_c_during_start_up_prints_one_line(tmp_path):
    """SIGINT at several instants of start-up (imports, model load): always the one line, exit 130."""
    import signal

    code = "import sys; from app.cli import main; sys.exit(main())"
    for delay in (0.5, 2.0):  # inside the imports of torch & co, then in the model load
        proc = subprocess.Popen([sys.executable, "-c", code, "analyze", "--model", "tiny-llama", "--n", "2",
                                 "--out", str(tmp_path / "out"), "--no-progress"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            continue  # finished before the signal: nothing to check at this instant
        assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("cancelled")


def test_the_cancel_message_says_what_was_written(tmp_path):
    from types import SimpleNamespace

    from app.cli import _folder_id, cancel_message

    out = tmp_path / "run"
    args = SimpleNamespace(run_target=(out, _folder_id(out)))
    assert cancel_message(args) == "cancelled: nothing was written"
    write_run(out, HEADS, {"version": 1})
    assert cancel_message(args).startswith("cancelled after the run was written")
    args = SimpleNamespace(run_target=(out, _folder_id(out)))
    assert "still holds the previous run" in cancel_message(args)
    write_run(out, HEADS, {"version": 2}, force=True)
    assert cancel_message(args).startswith("cancelled after the run was written")


def test_an_interrupted_kernel_pool_drops_its_queued_blocks():
    started = []

    def block(item):
        started.append(item)
        if item == 0:
            raise KeyboardInterrupt
        time.sleep(0.2)
    begin = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_blocks(block, list(range(40)), workers=2)
    assert time.perf_counter() - begin < 2.0 and len(started) < 40


# ------------------------------------------------------------------ item 12: say it loudly
def test_debug_mode_warns_loudly(monkeypatch, capsys):
    from types import SimpleNamespace

    import app.web.server as server

    fake = SimpleNamespace(workspace=SimpleNamespace(jobs=SimpleNamespace(shutdown=lambda: None)),
                           run=lambda **kwargs: None)
    monkeypatch.setattr(server, "create_app", lambda **kwargs: fake)
    server.serve(debug=True)
    assert "run Python code as you" in capsys.readouterr().err
    server.serve(debug=False)
    assert "WARNING" not in capsys.readouterr().err


def test_an_expired_analysis_says_why():
    from app.web.services.workspace import ResultCache

    cache = ResultCache(2, "analysis")
    first = cache.put("a")
    cache.put("b")
    cache.put("c")
    with pytest.raises(InputError, match="keeps the 2 most recent of all sessions"):
        cache.get(first)


def test_models_list_flags_a_truncated_checkpoint(tmp_path, monkeypatch, capsys):
    import shutil

    from workbench.pull import cached_folder
    from workbench.registry import REGISTRY

    source = cached_folder(REGISTRY["tiny-llama"])
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    copy = tmp_path / "models" / "tiny-llama"
    shutil.copytree(source, copy)
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.truncate((copy / "model.safetensors").stat().st_size // 2)
    assert main(["models", "list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("tiny-llama"))
    assert "corrupt" in line


def _forge(client, deps: list[dict], input_id: str, state: dict) -> dict:
    """POST the Dash callback triggered by ``input_id``'s click as an attacker would, with any state."""
    spec = next(d for d in deps if any(i["id"] == input_id for i in d["inputs"]))
    outputs = [dict(zip(("id", "property"), part.rsplit(".", 1))) for part in spec["output"].strip(".").split("...")]
    body = {"output": spec["output"], "outputs": outputs,
            "inputs": [{"id": input_id, "property": "n_clicks", "value": 1}],
            "state": [dict(s, value=state.get(s["id"])) for s in spec["state"]],
            "changedPropIds": [f"{input_id}.n_clicks"]}
    response = client.post("/_dash-update-component", json=body)
    assert response.status_code in (200, 204)
    return response.get_json() or {}


def test_forged_load_example_requests_never_read_files(tmp_path):
    """Item 3 at the HTTP level (how an attacker calls the app, whatever the page offers): a
    Load-example request naming any file path is refused and the file's text is never returned;
    a bundled name starts the job."""
    from app.web.factory import create_app

    secret = tmp_path / "notes.txt"
    secret.write_text("TOP SECRET LINE\n")
    app = create_app("tiny-llama", runs_dir=tmp_path / "runs")
    try:
        client = app.server.test_client()
        deps = client.get("/_dash-dependencies").get_json()
        base = {"prompt-model": "tiny-llama", "prompt-folder": "", "prompt-example": "0"}
        for path in (str(secret), f"~/../..{secret}", f"{secret.parent}/../{secret.parent.name}/notes.txt",
                     "../../etc/passwd", "/etc/hostname"):
            answer = json.dumps(_forge(client, deps, "prompt-load-example", dict(base, **{"prompt-dataset": path})))
            assert "is not available in the app" in answer and "TOP SECRET" not in answer, path
            assert "prompt-job-store" not in answer  # no job started
        started = _forge(client, deps, "prompt-load-example", dict(base, **{"prompt-dataset": "induction"}))
        assert started["response"]["prompt-job-store"]["data"]  # the control: a bundled name runs
    finally:
        app.workspace.jobs.shutdown()
