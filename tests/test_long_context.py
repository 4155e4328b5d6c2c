"""Long-context probes (docs/metrics.md §10): kernels vs materialised maps, planted heads, needle data, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from kernels import long_context as lck
from kernels.reference import reference_probs
from probes.pipeline import analyze
from probes.retrieval import Retrieval
from probes.sparsity_profile import SparsityProfile, saliency_share
from workbench.capture import capture
from workbench.data import load_dataset
from workbench.errors import InputError
from workbench.long_context import LongContextSettings, map_rows
from workbench.model import hook_name

LC_METRICS = ("block_density_90", "block_density_95", "xattn_recall", "xattn_density", "hess_recall",
              "hess_density", "streaming_mass")


# ------------------------------------------------------------------ kernels vs the materialised map
@pytest.mark.parametrize("causal,hq,hkv,n,bs,window,sinks", [
    (True, 4, 2, 203, 16, 40, 4), (True, 3, 3, 128, 32, 1, 0), (False, 2, 1, 77, 8, 10, 2), (True, 2, 2, 64, 64, 0, 4),
])
def test_block_pass_equals_materialised_map(causal, hq, hkv, n, bs, window, sinks):
    torch.manual_seed(n)
    q, k = torch.randn(hq, n, 16) * 1.5, torch.randn(hkv, n, 16) * 1.5
    probs, lse, _ = reference_probs(q[None], k[None], causal=causal)
    settings = LongContextSettings(block_size=bs, window=window, sinks=sinks, stride=bs // 8 or 1)
    expected = map_rows(probs[0], causal=causal, settings=settings)
    got = lck.block_pass(q, k, lse[0], causal=causal, block_size=bs, window=window, sinks=sinks,
                         block_q=2 * bs, block_k=3 * bs)
    assert torch.equal(got.argmax, expected.argmax)
    assert got.argmax_prob == pytest.approx(expected.argmax_prob, abs=1e-6)
    assert got.streaming == pytest.approx(expected.streaming, abs=1e-5)
    assert got.block_mass == pytest.approx(expected.block_mass, abs=1e-5)
    # straightforward definitions, written out
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    near = ((j < sinks) | ((i - j < window) & (j <= i))).float()
    assert got.streaming == pytest.approx((probs[0] * near).sum(-1), abs=1e-5)
    nb = -(-n // bs)
    pooled = torch.zeros(hq, nb, nb)
    for t in range(nb):
        for u in range(nb):
            pooled[:, t, u] = probs[0, :, t * bs:(t + 1) * bs, u * bs:(u + 1) * bs].sum((1, 2))
    assert got.block_mass == pytest.approx(pooled, abs=1e-5)


@pytest.mark.parametrize("causal,pad,hq,hkv,bs,block_q", [
    (True, False, 4, 2, 16, None), (True, True, 4, 4, 32, 64), (False, True, 3, 1, 16, None), (False, False, 2, 2, 64, 64),
])
def test_row_pass_rows_equal_materialised_map(causal, pad, hq, hkv, bs, block_q):
    """The long-context rows the row_pass loop computes in the forward's own pass (RowExtras) equal the
    straightforward computation on the map, sample by sample, padding included."""
    from kernels import attention_with_stats, cpu_fused

    if cpu_fused.row_softmax() is None:
        pytest.skip("no C compiler: the row pass is not built")
    torch.manual_seed(hq + bs)
    n, lengths = 150, [150, 111] if pad else [150, 150]
    q, k, v = torch.randn(2, hq, n, 16) * 1.5, torch.randn(2, hkv, n, 16) * 1.5, torch.randn(2, hkv, n, 16)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None] if pad else None
    settings = LongContextSettings(block_size=bs, window=30, sinks=3, stride=8)
    got = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, backend="row_pass", block_q=block_q,
                               row_extras=lck.RowExtras(sinks=3, window=30, block_size=bs)).rows
    for b, length in enumerate(lengths):
        probs, _, _ = reference_probs(q[b:b + 1, :, :length], k[b:b + 1, :, :length], causal=causal)
        expected = map_rows(probs[0], causal=causal, settings=settings)
        nb = -(-length // bs)
        assert torch.equal(got.argmax[b, :, :length], expected.argmax)
        assert got.argmax_prob[b, :, :length] == pytest.approx(expected.argmax_prob, abs=1e-6)
        assert got.streaming[b, :, :length] == pytest.approx(expected.streaming, abs=1e-5)
        assert got.block_mass[b, :, :nb, :nb] == pytest.approx(expected.block_mass, abs=1e-5)
        assert float(got.block_mass[b, :, nb:].abs().sum()) == 0.0  # padding rows add nothing
        assert (got.argmax[b, :, length:] == -1).all()


def test_row_extras_bad_inputs():
    from kernels import attention_with_stats, cpu_fused

    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 48, 8), torch.randn(1, 2, 48, 8)
    with pytest.raises(ValueError, match="block_size"):
        attention_with_stats(q, k, v, backend="row_pass", row_extras=lck.RowExtras(block_size=0))
    if cpu_fused.row_softmax() is not None:
        with pytest.raises(ValueError, match="Nq == Nk"):
            attention_with_stats(q, k, v, backend="row_pass", row_extras=lck.RowExtras())
        with pytest.raises(ValueError, match="multiple of the pooled-mass block size"):
            attention_with_stats(q, k[:, :, :40], v[:, :, :40], backend="row_pass", block_q=16,
                                 row_extras=lck.RowExtras(block_size=32))
    assert attention_with_stats(q, k, v, backend="chunked", row_extras=lck.RowExtras(block_size=None)).rows is None


def test_block_density_counts_fewest_blocks():
    mass = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.45, 0.0], [0.05, 0.45, 0.5]]])  # [H=1, nqb=3, nkb=3]
    visible = torch.tensor([1, 2, 3])
    assert lck.block_density(mass, visible, 0.9)[0].tolist() == pytest.approx([1.0, 1.0, 2 / 3])
    assert lck.block_density(mass, visible, 0.5)[0].tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    with pytest.raises(ValueError, match="tau"):
        lck.block_density(mass, visible, 0.0)


def test_threshold_select_and_recall():
    scores = torch.tensor([[[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.05, 0.9, 0.05]]])
    keep = lck.threshold_select(scores, 0.9)
    # row 2: first and diagonal forced (0.1 together), then block 1 reaches 0.9
    assert keep[0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    keep = lck.threshold_select(scores, 0.9, force_first=False, force_diagonal=False)
    assert keep[0, 2].tolist() == [False, True, False] or keep[0, 2].tolist() == [True, True, False]
    mass = torch.tensor([[[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 2.0]]])
    assert lck.selected_recall(mass, keep)[0, :2].tolist() == pytest.approx([1.0, 1.0])


def test_antidiagonal_scores_follow_the_definition():
    torch.manual_seed(1)
    hq, n, d, stride, bs = 2, 40, 8, 4, 8
    q, k = torch.randn(hq, n, d), torch.randn(hq, n, d)
    scale = d ** -0.5
    got = lck.antidiagonal_block_scores(q, k, stride=stride, block_size=bs, scale=scale, chunk=3)
    cells = n // stride
    s = torch.full((hq, cells, cells), float("-inf"))
    for a in range(cells):
        for b in range(a + 1):
            s[:, a, b] = sum((q[:, a * stride + stride - 1 - r] * k[:, b * stride + r]).sum(-1)
                             for r in range(stride)) * scale / stride
    w = torch.softmax(s, -1)
    per = bs // stride
    expected = w.view(hq, cells // per, per, cells // per, per).sum((2, 4))
    assert got == pytest.approx(expected, abs=1e-5)
    assert got.sum(-1) == pytest.approx(torch.full((hq, n // bs), float(per)), abs=1e-4)
    with pytest.raises(ValueError, match="divide"):
        lck.antidiagonal_block_scores(q, k, stride=3, block_size=bs)


def test_kernel_rejects_bad_blocks():
    q, k, lse = torch.randn(2, 8, 4), torch.randn(2, 8, 4), torch.zeros(2, 8)
    with pytest.raises(ValueError, match="block_size"):
        lck.block_pass(q, k, lse, block_size=0)
    with pytest.raises(ValueError, match="shapes"):
        lck.block_pass(q, k[:, :5], lse)


# ------------------------------------------------------------------ needle data
def test_needle_dataset_layout(tiny_llama):
    batch = load_dataset("needle", tiny_llama, n=3, seq_len=300)
    assert batch.tokens.shape == (3, 300)
    depths = [m["depth"] for m in batch.meta]
    assert depths == sorted(depths) and depths[0] < 0.3 and depths[-1] > 0.7
    for tokens, meta in zip(batch.tokens, batch.meta):
        (t0, t1), (a0, a1) = meta["needle_span"], meta["answer_span"]
        assert a1 == 300 and a0 < a1
        assert tiny_llama.tokenizer.decode(tokens[t0:t1]).strip() == meta["needle"]
        assert tiny_llama.tokenizer.decode(tokens[a0:a1]).strip() == meta["answer"]
        assert meta["answer"] in meta["needle"]
    with pytest.raises(InputError, match="too short"):
        load_dataset("needle", tiny_llama, n=1, seq_len=40)


def _jsonl(tmp_path, items, name="needles.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    return str(path)


def test_needle_jsonl_errors(tiny_llama, tmp_path):
    good = {"prompt": "The sky is blue today. Question: what colour is the sky? Answer:", "needle": "The sky is blue",
            "answer": " blue"}
    batch = load_dataset(_jsonl(tmp_path, [good]), tiny_llama)
    (t0, t1), (a0, a1) = batch.meta[0]["needle_span"], batch.meta[0]["answer_span"]
    answer_ids = tiny_llama.tokenizer(" blue", add_special_tokens=False)["input_ids"]
    assert batch.tokens[0, a0:a1].tolist() == answer_ids and a1 == int(batch.lengths[0])
    assert tiny_llama.tokenizer.decode(batch.tokens[0, t0:t1]).strip() == "The sky is blue"
    with pytest.raises(InputError, match="needle is not in the prompt"):
        load_dataset(_jsonl(tmp_path, [dict(good, needle="The sea is green")]), tiny_llama)
    with pytest.raises(InputError, match="answer is empty"):
        load_dataset(_jsonl(tmp_path, [dict(good, answer="  ")]), tiny_llama)
    with pytest.raises(InputError, match="string 'answer'"):
        load_dataset(_jsonl(tmp_path, [{"prompt": "x", "needle": "x"}]), tiny_llama)


# ------------------------------------------------------------------ planted heads
TARGET = 7  # the lowest-frequency RoPE component of d_head 16: its rotation is negligible over ~100 tokens


def _planted_hooks(batch, answer_id):
    """Layer 0 of tiny-llama (4 query heads, 2 KV heads):

    - query head 0 / KV head 0: keys of the answer token get +10 on TARGET, every other key 0; the
      query is +10 on TARGET for every row: each row attends to the earlier answer tokens (the needle);
    - query head 2 / KV head 1: only the first key is marked: a first-token (sink) head;
    - query heads 1 and 3 have a zero query: uniform heads.
    """
    marked = batch.tokens == answer_id  # [B, N]

    def keys(k, hook):
        k = k.clone()
        k[:, :, :, :] = 0.0
        k[..., 0, TARGET] = 10.0 * marked[:, : k.shape[1]].to(k.dtype)
        k[:, 0, 1, TARGET] = 16.0
        return k

    def queries(q, hook):
        q = torch.zeros_like(q)
        q[:, :, 0, TARGET] = 10.0
        q[:, :, 2, TARGET] = 16.0
        return q

    return [(hook_name(0, "k"), keys), (hook_name(0, "q"), queries)]


@pytest.fixture(scope="module")
def planted_needles(tiny_llama, tmp_path_factory):
    answer = " blue"
    ids = tiny_llama.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, "the planted test needs a one-token answer"
    filler = "The quick brown fox jumps over the lazy dog near the river bank. " * 6
    items = []
    for depth in (0.1, 0.5, 0.9):
        cut = int(len(filler) * depth)
        cut = filler.rfind(". ", 0, cut) + 2 if filler.rfind(". ", 0, cut) > 0 else 0
        needle = "The sky is blue today."
        prompt = filler[:cut] + needle + " " + filler[cut:] + "Question: what colour is the sky? Answer:"
        items.append({"prompt": prompt, "needle": needle, "answer": answer})
    path = tmp_path_factory.mktemp("needles") / "planted.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    return load_dataset(str(path), tiny_llama), ids[0]


@pytest.mark.parametrize("mode", ["patterns", "stats"])
def test_planted_retrieval_and_sink_heads(tiny_llama, planted_needles, mode):
    batch, answer_id = planted_needles
    cap = capture(tiny_llama, batch, layers=[0], mode=mode, progress=False, detectors=False,
                  fwd_hooks=_planted_hooks(batch, answer_id), long_context=LongContextSettings(block_size=16, stride=4))
    retrieval = Retrieval().fit(cap)
    assert retrieval.per_sample_["retrieval_score"][:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert retrieval.per_sample_["retrieval_score"][:, 0, 2].tolist() == [0.0, 0.0, 0.0]  # argmax on the first token
    sparsity = SparsityProfile(block_size=16, stride=4).fit(cap)
    assert sparsity.per_sample_["streaming_mass"][:, 0, 2] == pytest.approx(torch.ones(3), abs=1e-6)
    for s, n in enumerate(batch.lengths.tolist()):
        expected = lck.visible_blocks(n, 16).float().reciprocal().mean()
        assert float(sparsity.per_sample_["block_density_90"][s, 0, 2]) == pytest.approx(float(expected), abs=1e-6)
        assert float(sparsity.per_sample_["block_density_95"][s, 0, 2]) == pytest.approx(float(expected), abs=1e-6)
        assert float(sparsity.per_sample_["block_density_90"][s, 0, 1]) > 2 * float(expected)  # uniform head
    assert sparsity.per_sample_["xattn_recall"][:, 0, 2] == pytest.approx(torch.ones(3), abs=1e-6)


def test_stats_equal_patterns_on_needles(tiny_llama):
    batch = load_dataset("needle", tiny_llama, n=3, seq_len=260)
    settings = LongContextSettings(block_size=32, window=48)
    caps = {mode: capture(tiny_llama, batch, mode=mode, progress=False, detectors=False, long_context=settings,
                          batch_size=2 if mode == "stats" else 8)  # chunks: rows land at the right samples
            for mode in ("patterns", "stats")}
    pat, st = caps["patterns"].extras, caps["stats"].extras
    assert torch.equal(pat["lc.argmax"], st["lc.argmax"])
    for name in ("lc.argmax_prob", "lc.streaming", "lc.density_90", "lc.density_95", "lc.xattn_recall",
                 "lc.hess_recall", "lc.xattn_density", "lc.hess_density"):
        assert st[name] == pytest.approx(pat[name], abs=1e-5), name
    scores = {mode: Retrieval().fit(cap).per_sample_["retrieval_score"] for mode, cap in caps.items()}
    assert torch.equal(scores["patterns"], scores["stats"])


def test_in_pass_rows_equal_the_second_pass(tiny_llama, monkeypatch):
    """The rows the row_pass loop gives in the forward's own pass equal the second pass
    (block_pass with the saved LSE) that a backend without them falls back to."""
    from kernels import row_pass

    calls = []
    real = lck.block_pass
    monkeypatch.setattr(lck, "block_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = load_dataset("needle", tiny_llama, n=2, seq_len=230)
    settings = LongContextSettings(block_size=32, window=40)
    in_pass = capture(tiny_llama, batch, mode="stats", progress=False, detectors=False, long_context=settings).extras
    assert not calls  # the row_pass loop gave every row
    monkeypatch.setattr(row_pass, "available", lambda q: False)  # auto -> sdpa_recompute: no rows in the pass
    second = capture(tiny_llama, batch, mode="stats", progress=False, detectors=False, long_context=settings).extras
    assert len(calls) == 2 * tiny_llama.n_layers  # one second pass per sample and layer
    assert torch.equal(in_pass["lc.argmax"], second["lc.argmax"])
    for name in ("lc.argmax_prob", "lc.streaming", "lc.density_90", "lc.density_95", "lc.xattn_recall", "lc.hess_recall"):
        assert in_pass[name] == pytest.approx(second[name], abs=1e-5), name


def test_pipeline_requests_rows_once_and_tables(tiny_llama):
    batch = load_dataset("needle", tiny_llama, n=2, seq_len=200)
    result = analyze(tiny_llama, batch, probes="retrieval,sparsity", mode="stats", progress=False)
    assert "lc.density_90" in result.capture.extras
    assert set(result.table["metric"]) == {"retrieval_score", "saliency_share_90", *LC_METRICS}
    values = result.table["value"]
    assert ((values >= 0) & (values <= 1)).all()
    kv = result.probes["sparsity"].kv_saliency_
    assert 0 < kv["mean"] <= 1 and len(kv["per_sample"]) == 2


def test_saliency_share():
    sal = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    assert saliency_share(sal, mask, 0.7).tolist() == [0.5]  # 4 + 3 = 7 of 10, over 4 real tokens
    assert saliency_share(sal, mask, 0.9).tolist() == [0.75]


def test_bad_inputs(tiny_llama):
    batch = tiny_llama.tokenize(["no needle in this prompt at all"])
    with pytest.raises(InputError, match="needle samples"):
        analyze(tiny_llama, batch, probes="retrieval", progress=False)
    with pytest.raises(InputError, match="block_size=0"):
        SparsityProfile(block_size=0).check_params()
    with pytest.raises(InputError, match="stride=5 must divide"):
        SparsityProfile(stride=5).check_params()
    with pytest.raises(InputError, match="keep"):
        SparsityProfile(keep=1.5).check_params()
    cap = capture(tiny_llama, batch, progress=False)
    with pytest.raises(InputError, match="long-context rows"):
        SparsityProfile().fit(cap)
    with pytest.raises(InputError, match="unedited"):
        capture(tiny_llama, batch, progress=False, interventions="L0H0:softpag=0.5",
                long_context=LongContextSettings())


# ------------------------------------------------------------------ app service (Long context page)
def test_long_context_page_service(tiny_llama):
    from app.web.jobs import Cancelled, Job, JobContext
    from app.web.services import long_context as svc
    from app.web.services.workspace import Workspace

    ws = Workspace(default_model="tiny-llama")
    try:
        with pytest.raises(InputError, match="no needle depth"):
            svc.start_taxonomy(ws, "tiny-llama", 512, [])
        with pytest.raises(InputError, match="length 300"):
            svc.start_taxonomy(ws, "tiny-llama", 300, [0.5])
        status = ws.jobs.wait(svc.start_taxonomy(ws, "tiny-llama", 512, [0.1, 0.9]))
        assert status["state"] == "done", status
        tax = ws.taxonomies.get(ws.jobs.result(status["id"])["key"])
        assert len(tax.table) == tiny_llama.n_layers * tiny_llama.n_heads and len(tax.batch) == 2
        fig = svc.taxonomy_figure(tax)
        assert len(fig.data[0].x) == len(tax.table)
        assert [list(c[:2]) for c in fig.data[0].customdata] == tax.table[["layer", "head"]].values.tolist()
        thumb, row = svc.head_view(tax, 1, 2, 1)
        a0, a1 = tax.batch.meta[1]["answer_span"]
        assert len(row.data) == a1 - a0 and len(row.data[0].y) == 512
        assert all(abs(sum(trace.y) - 1) < 1e-4 for trace in row.data)  # each exact row sums to 1
        with pytest.raises(InputError, match="sample 5"):
            svc.head_view(tax, 1, 2, 5)

        class CancelAtFirstLayer(JobContext):
            def progress(self, fraction, message):
                if "layer 1/" in message:
                    self._job.cancel_flag.set()
                super().progress(fraction, message)

        before = len(ws.taxonomies._items)
        with pytest.raises(Cancelled):
            svc.build_taxonomy("tiny-llama", 512, [0.5], CancelAtFirstLayer(Job(id="x", kind="long_context")))
        assert len(ws.taxonomies._items) == before
    finally:
        ws.jobs.shutdown()


def test_generated_answer_scoring(tiny_llama, monkeypatch):
    batch = load_dataset("needle", tiny_llama, n=2, seq_len=200)
    cap = capture(tiny_llama, batch, mode="stats", progress=False, detectors=False,
                  long_context=LongContextSettings(blocks=False))
    probe = Retrieval(generate=True).fit(cap, model=tiny_llama)
    assert probe.metrics_ == ("retrieval_score", "retrieval_score_generated")
    assert [isinstance(c, bool) for c in probe.answer_correct_] == [True, True]
    assert probe.per_sample_["retrieval_score_generated"].shape == probe.per_sample_["retrieval_score"].shape
    # a model whose greedy answer is the reference scores exactly the teacher-forced hits
    import workbench.forward as forward

    def reference_answer(model, ids, *, max_new_tokens, edits=None):
        row = next(i for i, m in enumerate(batch.meta) if torch.equal(batch.tokens[i, :len(ids)], ids))
        a0, a1 = batch.meta[row]["answer_span"]
        return batch.tokens[row, a0:a1]

    monkeypatch.setattr(forward, "generate_ids", reference_answer)
    same = Retrieval(generate=True).fit(cap, model=tiny_llama)
    assert same.answer_correct_ == [True, True]
    assert torch.equal(same.per_sample_["retrieval_score_generated"], same.per_sample_["retrieval_score"])
    with pytest.raises(InputError, match="needs the model"):
        Retrieval(generate=True).fit(cap)


# ------------------------------------------------------------------ CLI
def test_cli_needle_run(tmp_path, capsys, tiny_llama):
    import pandas as pd

    from app.cli import main

    out = tmp_path / "run"
    assert main(["analyze", "--model", "tiny-llama", "--dataset", "needle", "--seq-len", "200", "--n", "2",
                 "--probes", "retrieval,sparsity", "--generate", "--mode", "stats", "--out", str(out),
                 "--no-progress"]) == 0
    heads = pd.read_parquet(out / "heads.parquet")
    assert set(heads["metric"]) == {"retrieval_score", "retrieval_score_generated", "saliency_share_90", *LC_METRICS}
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["kv_saliency"]["per_sample"]) == 2 and len(manifest["generated_answers"]) == 2
    report = (out / "report.html").read_text()
    assert "Long-context taxonomy" in report and "streaming_mass (first 4 + last 256 keys)" in report
    assert main(["analyze", "--model", "tiny-llama", "--dataset", "needle", "--probes", "stats", "--generate",
                 "--out", str(tmp_path / "no")]) == 2
    assert "add retrieval to --probes" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
