"""model.py: causality, generation, optimizer groups, the MFU peak table."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import sum_tolerance  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
from mile import mile_loss  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from system import PEAK_FLOPS, peak_flops  # noqa: E402


def tiny(**kw):
    torch.manual_seed(0)
    defaults = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**defaults, **kw})).eval()


@pytest.mark.parametrize("arch, bias", [("gpt2", True), ("gpt2", False), ("llama", False)])
def test_causality(arch, bias):
    model = tiny(arch=arch, bias=bias)
    idx = torch.randint(0, 50, (2, 16))
    targets = torch.randint(0, 50, (2, 16))
    logits, _ = model(idx, targets)
    for t in (0, 7, 15):  # change the token at t: logits before t must not move, at t they must
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        new_logits, _ = model(changed, targets)
        torch.testing.assert_close(new_logits[:, :t], logits[:, :t], rtol=0, atol=0)
        assert not torch.allclose(new_logits[:, t], logits[:, t])


def test_forward_loss_is_the_configured_loss():
    model = tiny(loss="mile", gamma=2.0, sigma=0.5)
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50)
    torch.testing.assert_close(loss, mile_loss(logits, targets, gamma=2.0, sigma=0.5), rtol=0, atol=0)
    last, none = model(idx)
    assert none is None and last.shape == (3, 1, 50)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


@pytest.mark.parametrize("loss, arch", [("ce", "gpt2"), ("focal", "gpt2"), ("mile", "gpt2"), ("mile", "llama")])
def test_chunked_training_loss_matches_readable(loss, arch):
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    results = []
    for path in ("full", "chunked"):
        model = tiny(arch=arch, loss=loss).configure_run(path, loss_chunk_size=7).train()  # the same weights
        logits, value = model(idx, targets)
        assert (logits is None) == (path == "chunked")
        value.backward()
        results.append((value, {n: p.grad for n, p in model.named_parameters()}))
    (v1, g1), (v2, g2) = results
    tol = sum_tolerance(2 * 50 + 48 + 32)  # the sums of the head (tests/test_chunked.py), in another order
    torch.testing.assert_close(v2, v1, rtol=tol, atol=0)
    for name in g1:  # and back through the blocks, which sum over 32 features and 16 positions more
        scale = g1[name].abs().max().item()
        torch.testing.assert_close(g2[name], g1[name], rtol=0, atol=(tol + sum_tolerance(2 * 32 + 16)) * scale)


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


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_built_on_meta_then_initialised_is_the_model_gpt_builds(arch):
    """distributed.build makes the model on the meta device and draws its weights once it has memory: the
    same model GPT(config) draws from the same seed, with each weight from its distribution."""
    import distributed
    config = GPTConfig(block_size=16, vocab_size=500, n_layer=4, n_head=2, n_embd=64, arch=arch)
    one = distributed.Processes(0, 0, 1, 1)
    built = distributed.build(config, one, "fsdp", "cpu", seed=7, dtype="float32")
    direct = GPT(config)  # drew its weights after nn.Linear had drawn its own: draw them again from the seed
    torch.manual_seed(7)
    direct.init_weights()
    assert (built.lm_head.weight is built.transformer.wte.weight) == (arch == "gpt2")
    for (name, p), q in zip(built.named_parameters(), direct.parameters()):
        assert torch.equal(p, q), name
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:  # normal(0, std): the sample's mean and std within 5 standard errors
            std = 0.01 if arch == "llama" else (0.02 / (2 * 4) ** 0.5 if name.endswith("c_proj.weight") else 0.02)
            n = p.numel()
            assert abs(p.mean().item()) < 5 * std / n ** 0.5, name
            assert abs(p.std().item() - std) < 5 * std / (2 * n) ** 0.5, name


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_changes_no_number(dropout):
    """Recomputing each block in backward gives the loss and the gradients of keeping its activations."""
    results = []
    for checkpointing in (False, True):
        model = tiny(dropout=dropout).configure_run(activation_checkpointing=checkpointing).train()
        torch.manual_seed(1)  # the same dropout masks: checkpoint replays the random stream in the recompute
        idx = torch.randint(0, 50, (3, 16))
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt)  # the same forward
    for g, h in zip(grads, grads_ckpt):  # the same backward, its sums perhaps in another order
        torch.testing.assert_close(h, g, rtol=0, atol=sum_tolerance(3 * 16 * 50) * g.abs().max().item())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("loss_path", ["full", "chunked"])
def test_padded_vocabulary_is_out_of_the_loss(arch, loss_path):
    """A model whose tables are padded from 50 to 64 rows gives the loss and the gradients of the same weights
    unpadded; the padding's rows get no gradient, however large they are."""
    unpadded = tiny(arch=arch).configure_run(loss_path, loss_chunk_size=7).train()
    padded = GPT(GPTConfig(**{**vars(unpadded.config), "padded_vocab_size": 64})).train()
    padded.configure_run(loss_path, loss_chunk_size=7)
    with torch.no_grad():
        for (name, p), q in zip(padded.named_parameters(), unpadded.parameters()):
            p[:q.size(0)].copy_(q)
            p[q.size(0):].fill_(5.0)  # logits of 5 x sum(x): they would dominate any softmax they entered
    idx = torch.randint(0, 50, (3, 16))
    losses = []
    for model in (unpadded, padded):
        _, loss = model(idx, idx)
        loss.backward()
        losses.append(loss)
    # the same sums of n_embd products for the logits, then the loss's over V: only their order may differ
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=sum_tolerance(32 + 50), abs=0)
    for (name, p), q in zip(padded.named_parameters(), unpadded.parameters()):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad[:q.size(0)], q.grad, rtol=0, atol=sum_tolerance(3 * 16 * (32 + 50)) * scale)
        assert torch.all(p.grad[q.size(0):] == 0), name
    logits, _ = padded.eval()(idx)
    assert logits.size(-1) == 50  # generation and evaluation see the vocabulary only


def test_peak_flops_finds_every_gpu_by_its_own_entry():
    """Names are matched by substring, first match wins: a shorter name listed before a longer one
    ("H100" before "H100 PCIe", "A10" before "A10G") would hand the longer one's GPUs the wrong peak."""
    for key, flops in PEAK_FLOPS:
        assert peak_flops(f"NVIDIA {key} 80GB") == flops, key
    assert peak_flops("NVIDIA H100 80GB HBM3") == dict(PEAK_FLOPS)["H100"]  # the SXM card's torch name
    assert peak_flops("Some Future GPU") is None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_flops_per_token_is_what_a_training_step_computes(arch):
    """MFU's numerator against torch's own count (FlopCounterMode) of one forward and backward over full-length
    sequences. Attention runs on the math path, whose matmuls the counter sees (the fused kernels it does not
    count on a CPU); the formula counts causal attention whole, as that path computes it. The formula's 6N
    also counts the norms' weights and the biases, which no matmul multiplies: the one difference allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny(arch=arch, bias=arch == "gpt2").train()
    B, T = 2, model.config.block_size
    idx = torch.randint(0, 50, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    outside_matmuls = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert counter.get_total_flops() / (B * T) == model.flops_per_token() - 6 * outside_matmuls


# -----------------------------------------------------------------------------
# the LLaMA block and the paper's presets


def test_llama_block():
    model = tiny(arch="llama", n_ffn=40)
    names = dict(model.named_parameters())
    assert not any(n.endswith(".bias") for n in names)  # no biases
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied
    assert model.transformer.wpe is None  # positions come from the rotation
    assert isinstance(model.transformer.ln_f, torch.nn.RMSNorm) and model.transformer.ln_f.eps == 1e-5
    assert names["transformer.h.0.mlp.c_gate.weight"].shape == (40, 32)  # SwiGLU's extra projection
    assert names["transformer.h.0.mlp.c_fc.weight"].std().item() == pytest.approx(0.01, rel=0.1)  # init std 0.01


def test_rotary_scores_depend_on_relative_position_only():
    from model import rotate
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 10, 16, generator=g), torch.randn(1, 2, 10, 16, generator=g)
    positions = torch.arange(10)
    scores = rotate(q, positions) @ rotate(k, positions).transpose(-1, -2)
    for shift in (1, 7, 1000):  # shifting every position changes no score
        shifted = rotate(q, positions + shift) @ rotate(k, positions + shift).transpose(-1, -2)
        # a float32 angle of about p radians is off by up to p * eps, which turns q and k by that much each;
        # then 16 products are summed
        tol = (2 * (shift + 10) * EPS32 + sum_tolerance(16)) * (q.norm(dim=-1).max() * k.norm(dim=-1).max()).item()
        torch.testing.assert_close(shifted, scores, rtol=0, atol=tol)
    assert not torch.allclose(scores, q @ k.transpose(-1, -2), atol=1e-2)  # but it does rotate
    torch.testing.assert_close(rotate(q, torch.zeros(10, dtype=torch.long)), q)  # position 0: no turn
    # a rotation keeps lengths
    torch.testing.assert_close(rotate(q, positions).norm(dim=-1), q.norm(dim=-1))


def preset(name):
    settings = {}
    with open(os.path.join(ROOT, "config", f"{name}.py")) as f:
        exec(f.read(), {}, settings)
    keys = ("arch", "n_layer", "n_head", "n_embd", "n_ffn", "block_size", "bias")
    return {k: settings[k] for k in keys if k in settings}, settings


# exact counts from the shapes, so they cannot drift; and within 1% of the names the paper gives them
# (docs/mile.md: the paper names them 468M and 1.2B; these shapes give 468.2M and 1.205B)
@pytest.mark.parametrize("name, exact, named", [
    ("paper_468m", 468_239_360, 468.7e6), ("paper_1b", 1_204_881_408, 1.21e9),
    ("paper_7b", 6_738_415_616, 6.7e9), ("gpt2_124m", 124_439_808, 124e6)])
def test_preset_parameter_counts(name, exact, named):
    shape, settings = preset(name)
    vocab = 50257 if name.startswith("gpt2") else 32000  # the LLaMA tokenizer's vocabulary, as in the paper
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(GPTConfig(vocab_size=vocab, **shape))
    n = model.get_num_params(non_embedding=False)
    assert n == exact and n == pytest.approx(named, rel=0.01), f"{name}: {n:,}"
    if name.startswith("paper"):
        batch = settings["batch_size"] * settings["gradient_accumulation_steps"]
        assert settings["learning_rate"] == 3e-4 and (settings["beta1"], settings["beta2"]) == (0.9, 0.95)
        assert settings["weight_decay"] == 0.1 and settings["grad_clip"] == 1.0 and settings["min_lr"] == 0.0
        assert batch * settings["block_size"] in (1024 * 1024, 2048 * 2048)  # ~1M / ~4M tokens per step
        assert settings["gradient_accumulation_steps"] % 8 == 0  # splits over 8 GPUs
