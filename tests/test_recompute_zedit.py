"""Output edits inside the one attention function: same as hook_z edits, differentiable, KV-cached generation."""

from __future__ import annotations

import pytest
import torch

from workbench.attention_backend import AttentionCall
from workbench.forward import bridge_call, run
from workbench.head_edits import OutputEdits
from workbench.model import hook_name, next_token_loss

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Mary and John went to the store, John gave"]
LAYER, HEAD = 1, 2


class ZeroHead:
    """Editor zeroing one head's output; remembers the query lengths it saw."""

    def __init__(self, layer: int, head: int) -> None:
        self.layer, self.head, self.query_lengths = layer, head, []

    def __call__(self, z: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        if call.layer != self.layer:
            return z
        self.query_lengths.append(z.shape[1])
        z = z.clone()
        z[:, :, self.head] = 0.0
        return z


def zero_hook(z: torch.Tensor, hook) -> torch.Tensor:
    z = z.clone()
    z[:, :, HEAD] = 0.0
    return z


def kernel_logits(model, batch, editors, backend="stats") -> torch.Tensor:
    return run(model, batch, backend=backend, edits=OutputEdits(editors))


@pytest.mark.parametrize("backend", ["stats", "sdpa"])
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_bert"])
def test_zero_editor_matches_hook_z_ablation(name, backend, request):
    """An edit inside the attention function equals a TransformerLens hook_z edit (eager map)."""
    model = request.getfixturevalue(name)
    batch = model.tokenize(PROMPTS)  # two lengths: a padded batch
    hooks = [(hook_name(LAYER, "z"), zero_hook)]
    edited = kernel_logits(model, batch, [ZeroHead(LAYER, HEAD)], backend)
    expected = model.run(batch, fwd_hooks=hooks)
    real = batch.mask
    torch.testing.assert_close(edited[real], expected[real], rtol=1e-4, atol=1e-4)
    plain = kernel_logits(model, batch, [])
    assert (plain[real] - expected[real]).abs().max() > 1e-3  # the ablation does change the logits
    if model.causal:
        torch.testing.assert_close(next_token_loss(edited, batch), model.loss(batch, fwd_hooks=hooks),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_editor_is_differentiable_like_hook_z(name, request):
    """d loss / d ξ for z[head] <- ξ · z[head] (gradient importance) equals the bridge's."""
    model = request.getfixturevalue(name)
    batch = model.tokenize(PROMPTS)

    def scaled(xi):
        def edit(z, call):
            if call.layer != LAYER:
                return z
            factor = torch.ones(z.shape[2])
            factor = factor.index_put((torch.tensor([HEAD]),), xi)
            return z * factor[None, None, :, None]
        return edit

    xi = torch.ones(1, requires_grad=True)
    logits = run(model, batch, edits=OutputEdits([scaled(xi)]), grad=True)
    next_token_loss(logits, batch).backward()
    xi_ref = torch.ones(1, requires_grad=True)

    def hook(z, hook):
        factor = torch.ones(z.shape[2]).index_put((torch.tensor([HEAD]),), xi_ref)
        return z * factor[None, None, :, None]

    model.loss(batch, fwd_hooks=[(hook_name(LAYER, "z"), hook), ("blocks.0.attn.hook_pattern", lambda p, hook: p)],
               grad=True).backward()
    assert xi.grad is not None and xi.grad.abs() > 0
    torch.testing.assert_close(xi.grad, xi_ref.grad, rtol=1e-4, atol=1e-5)


def test_zero_editor_in_cached_greedy_generation(tiny_llama):
    model = tiny_llama
    batch = model.tokenize(PROMPTS[:1])
    editor = ZeroHead(LAYER, HEAD)
    with torch.no_grad(), bridge_call(model, batch.mask, edits=OutputEdits([editor])):
        out = model.bridge.original_model.generate(
            input_ids=batch.tokens, attention_mask=batch.mask.long(), max_new_tokens=5, do_sample=False,
            output_scores=True, return_dict_in_generate=True, pad_token_id=model.pad_id)
    n = batch.tokens.shape[1]
    assert editor.query_lengths[0] == n and set(editor.query_lengths[1:]) == {1}  # KV cache: one query a step
    sequence = out.sequences[:1]
    full = model.batch_from_ids([sequence[0]])
    expected = model.run(full, fwd_hooks=[(hook_name(LAYER, "z"), zero_hook)])[0, n - 1:-1]
    torch.testing.assert_close(torch.cat(out.scores), expected, rtol=1e-4, atol=1e-4)


def test_generation_with_left_padding_extends_the_mask(tiny_llama):
    """A left-padded batch generates what each prompt generates alone (the mask grows each step)."""
    model = tiny_llama
    ids = [model.encode(p) for p in PROMPTS]
    width = max(len(i) for i in ids)
    tokens = torch.stack([torch.cat([torch.full((width - len(i),), model.pad_id), i]) for i in ids])
    mask = torch.stack([torch.arange(width) >= width - len(i) for i in ids])
    args = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True,
                pad_token_id=model.pad_id)
    with torch.no_grad(), bridge_call(model, mask, edits=OutputEdits([ZeroHead(LAYER, HEAD)])):
        together = model.bridge.original_model.generate(input_ids=tokens, attention_mask=mask.long(), **args)
    for row, seq in enumerate(ids):
        with torch.no_grad(), bridge_call(model, torch.ones(1, len(seq), dtype=torch.bool),
                                          edits=OutputEdits([ZeroHead(LAYER, HEAD)])):
            alone = model.bridge.original_model.generate(input_ids=seq[None], attention_mask=torch.ones(1, len(seq)).long(),
                                                **args)
        torch.testing.assert_close(torch.stack([s[row] for s in together.scores]), torch.cat(alone.scores),
                                   rtol=1e-4, atol=1e-4)
