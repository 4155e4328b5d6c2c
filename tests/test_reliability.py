"""Never lose a result, never run planted code, never leave a stale process-wide setting."""

from __future__ import annotations

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
from workbench.runstore import read_run, write_run

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
    for leftover in tmp_path.glob(".old-run-*"):  # as if the process that wrote it had died
        leftover.rename(tmp_path / f".old-run-{_dead_pid()}")
    if step == "between the renames":
        assert not out.exists()  # the instant the fallback cannot avoid: reading the run puts it back
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
