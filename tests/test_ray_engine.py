"""The Ray engine (``--engine ray``): the same table as one process, one-line worker errors, --resume.

One local Ray cluster of 2 CPUs serves the whole module; the SmolLM2 runs use 8 short samples.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from app.cli import main

KEYS = ["layer", "head", "probe", "metric"]
ARGS = ["analyze", "--model", "smollm2-135m", "--dataset", "induction", "--n", "8", "--seq-len", "32",
        "--probes", "stats,detectors,sinks", "--no-progress"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason='the ray engine needs pip install -e ".[distributed]"')
    from probes.engine_ray import release_workers

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    release_workers()
    ray.shutdown()


@pytest.fixture(scope="module")
def local_table(smollm2):
    from probes.pipeline import analyze
    from workbench.data import load_dataset

    batch = load_dataset("induction", smollm2, n=8, seq_len=32, seed=0)
    return analyze(smollm2, batch, probes="stats,detectors,sinks", progress=False).table


def assert_same_table(got: pd.DataFrame, want: pd.DataFrame, probes=("stats", "detectors", "sinks"),
                      tol: float = 1e-5) -> None:
    assert list(got.columns) == list(want.columns) and got[KEYS].equals(want[KEYS])
    assert set(got["probe"]) == set(probes)
    for column in ("value", "ci_low", "ci_high"):
        a, b = want[column].to_numpy(float), got[column].to_numpy(float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), column
        assert np.abs(a[~np.isnan(a)] - b[~np.isnan(b)]).max() <= tol, column


@pytest.mark.smollm2
def test_ray_run_equals_the_one_process_run(ray_cluster, smollm2, local_table):
    from probes.engine_ray import RayEngine
    from probes.pipeline import analyze
    from workbench.data import load_dataset

    batch = load_dataset("induction", smollm2, n=8, seq_len=32, seed=0)
    result = analyze(smollm2, batch, probes="stats,detectors,sinks", progress=False, engine=RayEngine(workers=2))
    assert_same_table(result.table, local_table)
    engine = result.engine
    assert engine["engine"] == "ray" and engine["workers"] == 2 and engine["shards"] == 2
    assert engine["ray_version"] == ray_cluster.__version__ and result.capture is None
    assert result.probes["sinks"].n_samples_ == 8 and "noop_score" in set(result.table["metric"])


@pytest.mark.smollm2
def test_a_raising_worker_is_one_line_and_no_run(ray_cluster, smollm2, tmp_path, capsys):
    from probes.engine_ray import RayEngine
    from probes.pipeline import analyze
    from probes.sinks import Sinks
    from workbench.errors import InputError

    batch = smollm2.tokenize(["The cat sat on the mat.", "A dog barked twice."])
    with pytest.raises(InputError) as err:  # checked only inside fit, on the workers
        analyze(smollm2, batch, probes=[Sinks(sink_dims=[10 ** 6])], progress=False, engine=RayEngine(workers=2))
    message = str(err.value)
    assert "\n" not in message and message.startswith("Ray worker failed on shard ")
    assert "sink dimension 1000000 out of range" in message
    # through the CLI: VHD needs context spans the induction data lacks; the error comes from a worker
    out = tmp_path / "run"
    assert main(ARGS[:-3] + ["--probes", "vhd", "--engine", "ray", "--out", str(out), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Ray worker failed on shard "), lines
    assert "has no context span" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.smollm2
def test_resume_after_a_kill_finishes_with_the_same_table(ray_cluster, local_table, tmp_path):
    from app.scaleout import resume_folder
    from probes.engine_ray import release_workers

    release_workers()  # free the cluster's 2 CPUs for the run we are about to kill
    out = tmp_path / "run"
    args = ARGS + ["--batch-size", "2", "--engine", "ray", "--workers", "2", "--resume", "--out", str(out)]
    address = ray_cluster.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args, "--address", address], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = resume_folder(out)
    try:
        deadline = time.monotonic() + 240
        while not list(shards.glob("shard-*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before a shard was kept: nothing to kill"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies: no chance to clean up
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kept = sorted(p.name for p in shards.glob("shard-*.safetensors"))
    assert 1 <= len(kept) < 4 and not out.exists()

    assert main(args) == 0  # the same command with --resume, in this process's cluster
    heads = pd.read_parquet(out / "heads.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["resumed_shards"] >= len(kept) and manifest["engine"]["shards"] == 4
    assert manifest["engine"]["workers"] == 2 and manifest["engine"]["ray_version"] == ray_cluster.__version__
    assert_same_table(heads, local_table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # shards removed once the run is written


@pytest.mark.smollm2
def test_ctrl_c_stops_the_run_and_writes_nothing(ray_cluster, tmp_path):
    """SIGINT mid-run (after a first shard is done): exit 130 with one line, no run folder."""
    from app.scaleout import resume_folder
    from probes.engine_ray import release_workers

    release_workers()
    out = tmp_path / "run"
    args = ARGS + ["--batch-size", "2", "--engine", "ray", "--workers", "2", "--resume", "--out", str(out)]
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args, "--address", address],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(resume_folder(out).glob("shard-*.safetensors")) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "cancelled" in err and "Traceback" not in err
    assert not out.exists()


def test_long_context_probes_on_ray_equal_the_one_process_run(ray_cluster, tiny_llama):
    from probes.engine_ray import RayEngine
    from probes.pipeline import analyze
    from workbench.data import load_dataset

    batch = load_dataset("needle", tiny_llama, n=4, seq_len=200)
    local = analyze(tiny_llama, batch, probes="retrieval,sparsity", mode="stats", progress=False)
    result = analyze(tiny_llama, batch, probes="retrieval,sparsity", mode="stats", progress=False,
                     engine=RayEngine(workers=2, shard_size=2))
    assert result.engine["shards"] == 2 and result.mode == "stats"
    assert_same_table(result.table, local.table, probes=("retrieval", "sparsity"), tol=1e-6)
    assert result.probes["sparsity"].kv_saliency_ == local.probes["sparsity"].kv_saliency_
    assert len(result.probes["sparsity"].kv_saliency_["per_sample"]) == 4


def test_without_ray_the_error_names_the_install(monkeypatch):
    from probes.engine_ray import RayEngine
    from workbench.errors import InputError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(InputError, match=r'needs Ray, which is not installed: pip install -e "\.\[distributed\]"'):
        RayEngine().analyze("tiny-llama", ["a prompt"], probes="stats", progress=False)


def test_ray_options_need_the_ray_engine(tmp_path, capsys):
    assert main(ARGS + ["--workers", "2", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == ("error: --workers, --address and --resume apply to --engine ray: "
                                               "add --engine ray")
