"""Generation with the key/value cache (model.GPT.generate / stream): the same tokens as without it,
for both blocks, also once the sequence outgrows block_size; the training forward unchanged for
torch.compile."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import sum_tolerance  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def tiny(arch, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, arch=arch, bias=True,
                         **kw)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_logits_equal_full_recomputation(arch):
    """Each cached step's logits are those of the whole prefix run without a cache."""
    model = tiny(arch)
    idx = torch.randint(0, 50, (2, 16))
    cache = [{} for _ in model.transformer.h]
    with torch.no_grad():
        steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 16)]
        for t, logits in zip(range(5, 17), steps):  # the same products, summed in other orders
            full = model(idx[:, :t])[0]
            tol = sum_tolerance(2 * (4 * 32 + 16 + 128) + 32) * full.abs().max().item()
            torch.testing.assert_close(logits, full, rtol=0, atol=tol)
    assert cache[0]["k"].shape == (2, 2, 16, 16)  # (B, n_head, T, head size)


@pytest.mark.parametrize("arch, seed", [("gpt2", 2), ("llama", 3)])
def test_greedy_with_cache_equals_without_past_block_size(arch, seed):
    model = tiny(arch)
    torch.manual_seed(seed)  # random weights large enough that greedy decoding does not repeat one token
    model = GPT(model.config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 / p.size(-1) ** 0.5 if p.dim() == 2 and "wte" not in name and "wpe" not in name else 1.0)
    idx = torch.randint(0, 50, (2, 5))
    cached = model.generate(idx, 40, temperature=0)  # 45 tokens: the window slides 29 times
    assert torch.equal(cached, model.generate(idx, 40, temperature=0, use_cache=False))
    assert len(set(cached[0, 16:].tolist())) > 1  # not a constant tail, which would hide a wrong window
    torch.manual_seed(7)
    sampled = model.generate(idx, 40, temperature=1.0, top_k=10)
    torch.manual_seed(7)
    assert torch.equal(sampled, model.generate(idx, 40, temperature=1.0, top_k=10, use_cache=False))


def test_sliding_window_needs_the_recomputation():
    """Why the cache is computed anew when the window slides: merely dropping the oldest cached
    token (keys and values computed in the old window, at the old positions) gives other logits."""
    model = tiny("llama")
    full = model.generate(torch.randint(0, 50, (1, 5)), 20, temperature=0, use_cache=False)
    cache = [{} for _ in model.transformer.h]
    with torch.no_grad():
        model(full[:, :16], cache=cache)
        for layer in cache:
            layer["k"], layer["v"] = layer["k"][:, :, 1:], layer["v"][:, :, 1:]
        stale = model(full[:, 16:17], cache=cache)[0]
        fresh = model(full[:, 1:17])[0]  # what generate computes: the window of the last block_size tokens
    assert (stale - fresh).abs().max() > 1e-3


@pytest.mark.parametrize("arch,recompute", [("gpt2", False), ("llama", False), ("llama", True)])
def test_training_forward_compiles_without_graph_breaks(arch, recompute):
    """torch.compile sees the training forward as one graph (one process, DDP): the cache argument adds no
    break, nor does activation checkpointing, which is inside the graph."""
    torch._dynamo.reset()
    model = tiny(arch).configure_run("chunked", compiled=True, activation_checkpointing=recompute).train()
    idx = torch.randint(0, 50, (2, 16))
    explained = torch._dynamo.explain(model)(idx, idx)  # the chunked loss stays outside, on purpose
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_sampling_never_draws_a_padding_id():
    """The padding's rows of the output table made to win every softmax they entered: no sample has one."""
    model = tiny("gpt2", padded_vocab_size=64)
    with torch.no_grad():
        model.lm_head.weight[50:] = 10.0 * model.transformer.ln_f.weight.sign()  # huge logits for ids 50 to 63
    out = model.generate(torch.zeros(8, 1, dtype=torch.long), max_new_tokens=20, temperature=1.0)
    assert out.max().item() < 50
    greedy = model.generate(torch.zeros(2, 1, dtype=torch.long), max_new_tokens=5, temperature=0.0)
    assert greedy.max().item() < 50
