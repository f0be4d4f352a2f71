"""model.py: causality, generation, optimizer groups, the MFU peak table."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mile import mile_loss  # noqa: E402
from model import GPT, GPTConfig, peak_flops  # noqa: E402


def tiny(**kw):
    torch.manual_seed(0)
    defaults = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, chunked_loss=False)
    return GPT(GPTConfig(**{**defaults, **kw})).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_causality(bias):
    model = tiny(bias=bias)
    idx = torch.randint(0, 50, (2, 16))
    targets = torch.randint(0, 50, (2, 16))
    logits, _ = model(idx, targets)
    for t in (0, 7, 15):  # change the token at t: logits before t must not move, at t they must
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        new_logits, _ = model(changed, targets)
        torch.testing.assert_close(new_logits[:, :t], logits[:, :t], rtol=0, atol=0)
        assert not torch.allclose(new_logits[:, t], logits[:, t])


def test_forward_loss_is_the_configured_objective():
    model = tiny(loss="mile", gamma=2.0, sigma=0.5)
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50)
    torch.testing.assert_close(loss, mile_loss(logits, targets, gamma=2.0, sigma=0.5))
    last, none = model(idx)
    assert none is None and last.shape == (3, 1, 50)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
def test_chunked_training_loss_matches_readable(loss):
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    reference_ce = F.cross_entropy(tiny()(idx, targets)[0].view(-1, 50), targets.view(-1))
    results = []
    for chunked in (False, True):
        model = tiny(loss=loss, chunked_loss=chunked, loss_chunk_size=7).train()  # the same weights each time
        logits, value = model(idx, targets)
        assert (logits is None) == chunked
        value.backward()
        results.append((value, {n: p.grad for n, p in model.named_parameters()}))
        # evaluation asks for plain CE, whatever the objective
        torch.testing.assert_close(model(idx, targets, objective="ce")[1], reference_ce)
    (v1, g1), (v2, g2) = results
    torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6)


def test_tied_embeddings_and_param_groups():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # every parameter once (the tied one too)


def test_generate():
    model = tiny()
    idx = torch.randint(0, 50, (2, 5))
    out = model.generate(idx, 20, temperature=1.0, top_k=3)  # longer than block_size: the context is cropped
    assert out.shape == (2, 25) and torch.equal(out[:, :5], idx)
    g1, g2 = model.generate(idx, 8, temperature=0), model.generate(idx, 8, temperature=0)
    assert torch.equal(g1, g2)
    # greedy picks the argmax at each step
    logits, _ = model(g1[:, :5])
    assert torch.equal(g1[:, 5], logits[:, -1].argmax(-1))
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(model.generate(idx, 8, temperature=5.0, top_k=1), g1)


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A10") == 125e12
    assert peak_flops("Some Future GPU") is None


def test_flops_per_token():
    model = tiny()
    n = model.get_num_params()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 16 * 32
