"""VHD / T-VHD / VHR (docs/metrics.md §5): planted zero head, exactness, inputs, sequential VHR, vision path."""

from dataclasses import dataclass

import pytest
import torch

from probes.base import FRAME_COLUMNS
from probes.vhd import VHD, compute_vhd, default_top_k, t_vhd
from probes.vhd_inputs import ContextPrompt, context_prompt, image_prompt, prompts_from_batch
from probes.vhr import VHR, paper_layers, select_layer_heads, vhr_select
from workbench.errors import InputError
from workbench.model import hook_name, load_model

TEXT = "<ctx>The capital of France is Paris, and the capital of Italy is Rome.</ctx>\n\nQuestion: what colour is the sky? Answer:"
ZERO_LAYER = 1


@pytest.fixture(scope="module")
def zero_head_model(tmp_path_factory):
    """tiny-llama whose layer-1 KV head 0 has W_V = 0 and query heads 0, 1 (which share it, GQA)
    have W_O = 0: their z is 0 in both branches (VHD 0) and they contribute nothing."""
    from transformers import LlamaForCausalLM

    from workbench.registry import REGISTRY
    from workbench.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("zero-head")
    build_tiny_model(dict(REGISTRY["tiny-llama"].tiny_config), folder)
    hf = LlamaForCausalLM.from_pretrained(folder)
    d = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        attn = hf.model.layers[ZERO_LAYER].self_attn
        attn.v_proj.weight[:d] = 0.0
        attn.o_proj.weight[:, : 2 * d] = 0.0
    hf.save_pretrained(folder)
    return load_model(str(folder))


def _direct_vhd(model, prompt: ContextPrompt) -> torch.Tensor:
    """``[L, H]`` from two separate plain forwards (an independent path to the same number)."""
    outs = []
    for ids in (prompt.ids, prompt.without_context()):
        seen = {}
        hooks = [(hook_name(l, "z"), lambda z, hook, l=l: seen.__setitem__(l, z[0, -1].detach()) or z)
                 for l in range(model.n_layers)]
        model.run(model.batch_from_ids([ids]), fwd_hooks=hooks)
        outs.append(torch.stack([seen[l] for l in range(model.n_layers)]))
    return (outs[0] - outs[1]).norm(dim=-1)


def test_zero_value_head_has_zero_vhd(zero_head_model):
    prompt = context_prompt(zero_head_model, TEXT)
    vhd, energy = compute_vhd(zero_head_model, [prompt])
    assert vhd[0][0, ZERO_LAYER, :2].abs().max() == 0.0
    assert energy[0][0, ZERO_LAYER, :2].abs().max() == 0.0
    assert (vhd[0][0, ZERO_LAYER, 2:] > 1e-6).all()   # the other KV head still reads the context


def test_vhd_matches_direct_forwards_and_batching(tiny_llama):
    prompts = [context_prompt(tiny_llama, TEXT),
               context_prompt(tiny_llama, "The quick brown fox jumps over the lazy dog. Who jumps?", span=(0, 44))]
    vhd, _ = compute_vhd(tiny_llama, prompts, batch_size=4)
    for prompt, got in zip(prompts, vhd):
        torch.testing.assert_close(got[0], _direct_vhd(tiny_llama, prompt), atol=1e-5, rtol=1e-4)
        assert (got >= 0).all() and got.max() > 0
    alone, _ = compute_vhd(tiny_llama, prompts[1:], batch_size=1)
    torch.testing.assert_close(alone[0], vhd[1], atol=1e-5, rtol=1e-4)


def test_vhd_per_generation_step(tiny_llama):
    prompt = context_prompt(tiny_llama, TEXT)
    y = torch.tensor(tiny_llama.tokenizer(" blue sky", add_special_tokens=False)["input_ids"])
    assert y.numel() >= 2
    steps, _ = compute_vhd(tiny_llama, [prompt], continuations=[y])
    assert steps[0].shape == (y.numel(), tiny_llama.n_layers, tiny_llama.n_heads)
    first, _ = compute_vhd(tiny_llama, [prompt])
    torch.testing.assert_close(steps[0][0], first[0][0], atol=1e-5, rtol=1e-4)
    last = ContextPrompt(torch.cat([prompt.ids, y[:-1]]), prompt.span)   # step T-1 sees y_<T-1
    torch.testing.assert_close(steps[0][-1], _direct_vhd(tiny_llama, last), atol=1e-5, rtol=1e-4)
    assert t_vhd(steps[0], 2).shape == (y.numel(),)


def test_identical_branches_give_zero_vhd(tiny_llama):
    @dataclass(frozen=True)
    class NoRemoval(ContextPrompt):
        def without_context(self):
            return self.ids

    base = context_prompt(tiny_llama, TEXT)
    vhd, _ = compute_vhd(tiny_llama, [NoRemoval(base.ids, base.span)])
    assert vhd[0].abs().max() == 0.0
    assert t_vhd(vhd[0], 2).item() == 0.0


def test_marker_and_offset_spans_agree(tiny_llama):
    marked = context_prompt(tiny_llama, TEXT)
    clean = TEXT.replace("<ctx>", "").replace("</ctx>", "")
    by_offsets = context_prompt(tiny_llama, clean, span=(0, clean.index("\n\n")))
    assert torch.equal(marked.ids, by_offsets.ids) and marked.span == by_offsets.span
    assert marked.span[0] == 1                          # after BOS
    assert tiny_llama.tokenizer.decode(marked.without_context()).startswith("<s>\n\nQuestion")


@pytest.mark.parametrize("text, span, match", [
    ("<ctx></ctx> Question: why? Answer:", None, "empty"),
    ("<ctx>   </ctx> Question: why? Answer:", None, "empty"),
    ("Question: why? Answer:", (5, 400), "outside"),
    ("Question: why? Answer:", (9, 9), "empty"),
    ("Question: why? Answer:", None, "mark the context"),
    ("<ctx>Paris</ctx> <ctx>Rome</ctx> Answer:", None, "mark the context"),
    ("Question: why? Answer:", (9, 22), "last prompt token"),
])
def test_bad_spans_raise(tiny_llama, text, span, match):
    with pytest.raises(InputError, match=match):
        context_prompt(tiny_llama, text, span=span)


def test_bad_inputs_raise(tiny_llama):
    with pytest.raises(InputError, match="alpha"):
        VHR(alpha=-1)
    with pytest.raises(InputError, match="alpha"):
        vhr_select(tiny_llama, context_prompt(tiny_llama, TEXT), alpha=-0.5)
    with pytest.raises(InputError, match="no context span"):
        VHD().fit(model=tiny_llama, batch=tiny_llama.tokenize(["plain text without a span"]))
    batch = tiny_llama.tokenize(["a b c d e"], meta=[{"span": [2, 40]}])
    with pytest.raises(InputError, match="outside the prompt"):
        prompts_from_batch(batch)
    with pytest.raises(InputError, match="not a vision-language model"):
        image_prompt(tiny_llama, "What is here?", torch.zeros(1, 3, 32, 32))
    with pytest.raises(InputError):
        t_vhd(torch.ones(2, 4), 5)
    with pytest.raises(InputError, match="top_k"):
        VHD(top_k=0).fit(model=tiny_llama, batch=batch)


def test_t_vhd_and_probe_frame(tiny_llama):
    vhd = torch.tensor([[[1.0, 5.0, 2.0, 0.0], [3.0, 3.0, 9.0, 1.0]]])   # [1, L=2, H=4]
    assert t_vhd(vhd, 2).tolist() == [1.0 * 0 + 5 + 2 + 9 + 3]
    assert default_top_k(9) == 2 and default_top_k(4) == 1
    batch = tiny_llama.tokenize(["The sky is blue today. Question: colour? Answer:"] * 2,
                                meta=[{"span": [1, 6]}, {"span": [1, 4]}])
    probe = VHD(top_k=2).fit(model=tiny_llama, batch=batch)
    frame = probe.to_frame()
    assert list(frame.columns) == FRAME_COLUMNS and len(frame) == tiny_llama.n_layers * tiny_llama.n_heads
    assert probe.per_sample_["vhd"].shape == (2, tiny_llama.n_layers, tiny_llama.n_heads)
    torch.testing.assert_close(probe.tvhd_, t_vhd(probe.per_sample_["vhd"], 2))
    part = VHD(top_k=2, layers=[1], heads=[0, 2]).fit(model=tiny_llama, batch=prompts_from_batch(batch))
    torch.testing.assert_close(part.per_sample_["vhd"], probe.per_sample_["vhd"][:, 1:, [0, 2]], atol=1e-5, rtol=1e-4)
    assert part.layers_ == [1] and part.heads_ == [0, 2] and len(part.to_frame()) == 2


def test_layer_selection_rule():
    vhd = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 0.6, 0.7, 0.8, 0.9])
    energy = torch.tensor([1.0, 1, 1, 1, 50, 1, 1, 1, 1])
    heads, outliers = select_layer_heads(vhd, energy)
    assert outliers == [4]                               # high VHD and high energy: set to 0
    assert heads == [5, 6, 7, 8]                         # strictly above the median (0.4)
    heads, outliers = select_layer_heads(vhd, torch.ones(9))
    assert outliers == [] and heads == [4, 6, 7, 8]      # high VHD alone is not an outlier (median 0.6)
    assert paper_layers(32) == [1] + list(range(18, 32))
    assert paper_layers(30) == [1] + list(range(17, 30))
    assert paper_layers(2) == [1]


def test_vhr_is_sequential_and_fixed(tiny_llama):
    prompt = context_prompt(tiny_llama, TEXT)
    selection = vhr_select(tiny_llama, prompt, alpha=3.0, layers=[0, 1])
    assert selection.n_selected > 0
    first = selection.interventions.items
    assert all(i.kind == "scale" and i.alpha == 3.0 for i in first)
    # layer 1's VHD was read with layer 0's selection reinforced (in both branches)
    from workbench.interventions import InterventionSet

    earlier = InterventionSet([i for i in first if i.layer == 0])
    reinforced, _ = compute_vhd(tiny_llama, [prompt], layers=[1], edits=earlier.compile(tiny_llama))
    plain, _ = compute_vhd(tiny_llama, [prompt], layers=[1])
    torch.testing.assert_close(selection.vhd[1], reinforced[0][0, 0])
    assert not torch.allclose(selection.vhd[1], plain[0][0, 0])
    vhr = VHR(alpha=3.0, layers=[0, 1]).fit(tiny_llama, prompt)
    vhr.generate(tiny_llama, max_new_tokens=3)
    assert vhr.steps_ and all(step == selection.interventions.text for step in vhr.steps_)


def test_vision_path_on_tiny_llava():
    model = load_model("tiny-llava")
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 32, 32, generator=generator)
    prompt = image_prompt(model, "What is in the picture?", image)
    assert prompt.span == (1, 17) and prompt.without_context().numel() == prompt.ids.numel() - 16
    vhd, energy = compute_vhd(model, [prompt])
    assert torch.isfinite(vhd[0]).all() and (vhd[0] >= 0).all() and vhd[0].max() > 0
    other, _ = compute_vhd(model, [image_prompt(model, "What is in the picture?", -image)])
    assert not torch.allclose(vhd[0], other[0])            # the pixels, not only the placeholders, matter
    vhr = VHR(layers=[0, 1]).fit(model, prompt)
    vhr.generate(model, max_new_tokens=2)
    assert vhr.selection_.n_selected > 0
    assert all(step == vhr.selection_.interventions.text for step in vhr.steps_)
    # the same numbers through a plain forward of the full sequence
    seen = {}
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(hook_name(1, "z"), lambda z, hook: seen.__setitem__("z", z[0, -1]) or z)]):
        model.bridge(prompt.ids[None], pixel_values=image)
    with_image = seen["z"].clone()
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(hook_name(1, "z"), lambda z, hook: seen.__setitem__("z", z[0, -1]) or z)]):
        model.bridge(prompt.without_context()[None])
    torch.testing.assert_close(vhd[0][0, 1], (with_image - seen["z"]).norm(dim=-1), atol=1e-5, rtol=1e-4)


@pytest.mark.smollm2
def test_smollm2_context_qa(smollm2):
    from workbench.data import load_dataset
    from workbench.intervened_run import generate

    batch = load_dataset("context_qa", smollm2, n=4)
    probe = VHD().fit(model=smollm2, batch=batch)
    vhd = probe.per_sample_["vhd"]
    assert vhd.shape == (4, 30, 9) and torch.isfinite(vhd).all() and (vhd >= 0).all() and vhd.max() > 0
    prompt = prompts_from_batch(batch)[0]
    vhr = VHR().fit(smollm2, prompt)
    assert vhr.selection_.n_selected > 0 and vhr.selection_.layers == paper_layers(30)
    text = vhr.generate(smollm2, max_new_tokens=2)
    assert len(vhr.steps_) >= 1 and set(vhr.steps_) == {vhr.selection_.interventions.text}
    assert text == generate(smollm2, batch.meta[0]["prompt"], vhr.selection_.interventions, max_new_tokens=2)
