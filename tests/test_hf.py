"""Hugging Face interop, offline: hf.from_pretrained (train.py and sample.py --init_from=gpt2|PATH)
on tiny random GPT2LMHeadModel / LlamaForCausalLM directories made here with transformers, export.py on
tiny checkpoints trained here, the tokenizers, sample.py's streaming, and the core without transformers."""

import json
import os
import subprocess
import sys

import pytest
import torch

import warm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import export  # noqa: E402
from conftest import sum_tolerance  # noqa: E402
from data.common import gpt2_encoding  # noqa: E402
from hf import from_pretrained, hf_model, hf_tokenizer, vocabulary  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

transformers = pytest.importorskip("transformers", reason="pip install -r requirements-hf.txt")
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM)

transformers.logging.disable_progress_bar()
TINY = ["--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2", "--log_interval=2",
        "--warmup_iters=2", "--learning_rate=1e-2"]
# the optional packages made unimportable; then a script runs as `python script args` would
BLOCK_HF = ("import runpy, sys\n"
            "for name in ('transformers', 'safetensors', 'tokenizers', 'huggingface_hub'):\n"
            "    sys.modules[name] = None\n")
WITHOUT_HF = BLOCK_HF + "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"

def start(script, *args, without_hf=False, env=None):
    """python script args in a process of its own (tests/warm.py), started; one thread (tiny models), so that two
    can run at once."""
    cmd = [sys.executable, *(["-c", WITHOUT_HF] if without_hf else []), os.path.join(ROOT, script), *args]
    return warm.start(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def finish(proc, check=True):
    stdout, stderr = proc.communicate(timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args[-3:])} failed:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run(script, *args, check=True, **kw):
    return finish(start(script, *args, **kw), check)


def one_sentence(proc_or_exit, *needles):
    """A bad input ends with one line 'error: ...' that names the problem, and no traceback."""
    if isinstance(proc_or_exit, SystemExit):
        text = str(proc_or_exit.code)
    else:
        assert proc_or_exit.returncode != 0 and "Traceback" not in proc_or_exit.stderr, proc_or_exit.stderr
        text = "\n".join(line for line in proc_or_exit.stderr.splitlines() if line.startswith("error:"))
    assert text.startswith("error:") and "\n" not in text, text
    for needle in needles:
        assert needle in text, text


def log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def randomized(model, seed=0):
    """Every parameter drawn anew (biases and norm gains too), so that a mix-up of weights shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.5).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


def assert_logits_close(actual, expected, model):
    """Two implementations of the same float32 model: each logit sums, through the layers, about
    n_layer * (4 d + T + n_ffn) + d products in its own order; tolerance relative to the largest logit."""
    c = model.config
    terms = c.n_layer * (4 * c.n_embd + c.block_size + (c.n_ffn or 4 * c.n_embd)) + c.n_embd
    tol = sum_tolerance(terms) * expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= tol, f"max |difference| {error:.3g} over the tolerance {tol:.3g}"


def ours_logits(model, idx):
    with torch.no_grad():
        return model.lm_head(model.hidden(idx))


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


# -----------------------------------------------------------------------------
# fixtures: two tiny char-level checkpoints (trained without transformers importable) and their exports


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{arch: out_dir} of 6-iteration runs on shakespeare_char, 2 layers, trained with the optional
    packages blocked: the core needs only torch, numpy, tiktoken, tqdm."""
    out = {arch: str(tmp_path_factory.mktemp(arch)) for arch in ("gpt2", "llama")}
    runs = [start("train.py", f"--out_dir={d}", f"--arch={arch}", "--n_layer=2", *TINY, "--max_iters=6",
                  "--eval_interval=6", without_hf=True) for arch, d in out.items()]  # both at once
    for proc in runs:
        finish(proc)
    return out


@pytest.fixture(scope="module")
def exported(trained):
    """{arch: directory} written by export.py's command line (in this process: transformers is loaded)."""
    out = {}
    argv = sys.argv
    try:
        for arch, out_dir in trained.items():
            out[arch] = os.path.join(out_dir, "hf")
            sys.argv = ["export.py", f"--out_dir={out_dir}", f"--to={out[arch]}"]
            export.main()
    finally:
        sys.argv = argv
    return out


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    """GPT-2's tokenizer as export.py builds it (deriving the merges takes a second: once)."""
    return hf_tokenizer({"tokenizer": "gpt2"})


def checkpoint_model(out_dir):
    return checkpoint.load_model(out_dir)


# -----------------------------------------------------------------------------
# import: Hugging Face -> ours


def tiny_hf(kind):
    vocab, common = 96, dict(max_position_embeddings=32, num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                             intermediate_size=48)
    if kind == "gpt2":  # tied, with biases, GPT-2's tanh GELU
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                          bos_token_id=0, eos_token_id=0))
    if kind == "gpt2-exact-gelu":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=80,
                                          activation_function="gelu", layer_norm_epsilon=1e-6,
                                          bos_token_id=0, eos_token_id=0))
    if kind == "llama":  # untied head, a rope base of its own
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, rope_theta=500.0, **common))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, rms_norm_eps=1e-5, **common))


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-exact-gelu", "llama", "llama-tied"])
def test_import_gives_the_same_logits(tmp_path, kind):
    hf = randomized(tiny_hf(kind))
    hf.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path)).eval()
    assert model.config.arch == kind.split("-")[0] and model.config.vocab_size == 96
    idx = torch.randint(0, 90, (2, 32))
    assert_logits_close(ours_logits(model, idx), hf_logits(hf, idx), model)
    # a vocabulary padded beyond the tokenizer's (96 rows, 90 ids used) and a shorter context: cut
    cut = from_pretrained(str(tmp_path), vocab_size=90, block_size=16).eval()
    assert_logits_close(ours_logits(cut, idx[:, :16]), hf_logits(hf, idx[:, :16])[..., :90], model)
    # and back: hf_model gives a transformers model with the same logits again
    assert_logits_close(hf_logits(hf_model(model, 96), idx), hf_logits(hf, idx), model)


@pytest.mark.parametrize("change, needles", [
    (dict(model="llama", num_key_value_heads=2), ["grouped-query attention (2 key/value heads for 4 query heads)"]),
    (dict(model="llama", rope_scaling={"rope_type": "linear", "factor": 2.0}), ["rotary embeddings with linear scaling"]),
    (dict(model="llama", attention_bias=True), ["biases in its attention or MLP"]),
    (dict(model="llama", hidden_act="gelu"), ["the activation gelu"]),
    (dict(model="gpt2", tie_word_embeddings=False), ["output layer untied"]),
    (dict(model="gpt2", scale_attn_by_inverse_layer_idx=True), ["attention scaled otherwise"]),
    (dict(model="gpt_neox"), ["is a gpt_neox model", "gpt2 and llama models only"]),
])
def test_import_refuses_what_it_cannot_load_exactly(tmp_path, change, needles):
    kind = change.pop("model")
    small = dict(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    config = {"llama": lambda: LlamaConfig(**small, **change),
              "gpt2": lambda: GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4, **change),
              "gpt_neox": lambda: transformers.GPTNeoXConfig(**small)}[kind]()
    config.save_pretrained(tmp_path)  # the refusal comes from config.json alone, before any weights
    with pytest.raises(SystemExit) as e:
        from_pretrained(str(tmp_path))
    one_sentence(e.value, "error:", *needles)


def test_import_checks_the_shape_and_the_vocabulary(tmp_path, trained, gpt2_tokenizer):
    randomized(tiny_hf("gpt2")).save_pretrained(tmp_path)
    for override, needles in [({"n_layer": 3}, ["n_layer=3 conflicts with", "whose weights have n_layer=2"]),
                              ({"arch": "llama"}, ["arch=llama conflicts"]),
                              ({"block_size": 64}, ["block_size=64 is more than the 32"])]:
        with pytest.raises(SystemExit) as e:
            from_pretrained(str(tmp_path), **override)
        one_sentence(e.value, *needles)
    from_pretrained(str(tmp_path), n_layer=2, n_ffn=128, bias=True)  # agreeing values are fine
    # a folder without tokenizer files: transformers makes up a near-empty tokenizer, which is no vocabulary
    char_meta = checkpoint.read(os.path.join(trained["gpt2"], "ckpt.pt"))["meta"]
    with pytest.raises(SystemExit) as e:
        from_pretrained(str(tmp_path), vocabulary(char_meta))
    one_sentence(e.value, "has no tokenizer to check the dataset's vocabulary of 84 tokens against",
                 "add the model's tokenizer files")
    # a character dataset on a model with GPT-2's tokenizer
    gpt2_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as e:
        from_pretrained(str(tmp_path), vocabulary(char_meta))
    one_sentence(e.value, "the dataset's vocabulary is not", "token '\\n' is id 0 in the dataset, None in the model")


# -----------------------------------------------------------------------------
# export: ours -> Hugging Face, on checkpoints that train.py wrote


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exported_model_loads_in_transformers_with_our_logits_and_greedy_text(exported, trained, arch):
    files = os.listdir(exported[arch])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    modes = {os.stat(os.path.join(exported[arch], f)).st_mode & 0o777 for f in files}
    assert len(modes) == 1, modes  # every file as the user's other files, model.safetensors too
    hf = AutoModelForCausalLM.from_pretrained(exported[arch], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported[arch])
    model, checkpoint = checkpoint_model(trained[arch])
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[arch]
    idx = torch.randint(0, checkpoint["meta"]["vocab_size"], (3, 32))
    assert_logits_close(ours_logits(model, idx), hf_logits(hf, idx), model)

    # HF's greedy generate gives our greedy decoding: sample.py's (run without transformers) for gpt2,
    # the same model.generate called here for llama
    prompt = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    assert torch.equal(generated, model.generate(prompt, 24, temperature=0))
    if arch == "gpt2":
        args = ["--start=ROMEO:", "--num_samples=1", "--max_new_tokens=24", "--temperature=0"]
        from_checkpoint = start("sample.py", f"--out_dir={trained[arch]}", *args, without_hf=True)
        from_export = start("sample.py", f"--init_from={exported[arch]}", *args)  # straight from the exported directory
        ours = finish(from_checkpoint)
        assert ours.stdout == tokenizer.decode(generated[0]) + "\n---------------\n"
        assert "24 tokens in" in ours.stderr and "tokens/s" in ours.stderr
        assert finish(from_export).stdout == ours.stdout


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_export_then_import_gives_identical_weights(exported, trained, arch):
    model, _ = checkpoint_model(trained[arch])
    back = from_pretrained(exported[arch])
    shape = ("arch", "n_layer", "n_head", "n_embd", "n_ffn", "block_size", "bias", "vocab_size", "norm_eps",
             "rope_theta", "gelu_approximate")
    # bias-free gpt2 included: its zero biases in the file are dropped again
    assert [getattr(back.config, k) for k in shape] == [getattr(model.config, k) for k in shape]
    original, again = model.state_dict(), back.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_tokenizers_round_trip(exported, trained, gpt2_tokenizer):
    # characters: the exported tokenizer encodes and decodes as the dataset's table does
    meta = checkpoint.read(os.path.join(trained["gpt2"], "ckpt.pt"))["meta"]
    chars = AutoTokenizer.from_pretrained(exported["gpt2"])
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.  "
    assert chars(text)["input_ids"] == [meta["stoi"][c] for c in text]
    assert chars.decode(chars(text)["input_ids"]) == text
    # GPT-2's BPE rebuilt from tiktoken's ranks: the same ids as tiktoken, and back to the same text
    enc = gpt2_encoding()
    bpe = gpt2_tokenizer
    text = ("Hello world! It's 2026: naïve café, ‘quotes’ — 日本語, emoji 🙂🚀\n\n   indented\tline"
            " don't<|endoftext|>The end. 12345 ÅÄÖ Ελληνικά Кириллица")
    ids = enc.encode(text, allowed_special="all")
    assert bpe(text)["input_ids"] == ids
    assert bpe.decode(ids) == text
    assert bpe.get_vocab() == vocabulary({"tokenizer": "gpt2"}) and len(bpe) == 50257


# -----------------------------------------------------------------------------
# train.py from pretrained weights


def test_train_from_an_exported_model_then_resume(exported, trained, tmp_path):
    source = [r for r in log(trained["gpt2"]) if "val_ce" in r][-1]
    args = [f"--out_dir={tmp_path}", f"--init_from={exported['gpt2']}", *TINY[2:], "--loss=ce", "--eval_interval=2"]
    proc = run("train.py", *args, "--max_iters=2")
    assert "starting from the weights of" in proc.stdout
    first = [r for r in log(tmp_path) if "val_ce" in r][0]
    # the same model: the same evaluation, up to the sums of the two processes' own orders
    assert first["iter"] == 0 and first["val_ce"] == pytest.approx(source["val_ce"], rel=sum_tolerance(2 * 84 + 4 * 32))
    saved = checkpoint.read(os.path.join(tmp_path, "ckpt.pt"))
    assert saved["config"]["n_layer"] == 2 and saved["model_args"]["n_layer"] == 2  # the weights' shape
    at_2 = [r for r in log(tmp_path) if "val_ce" in r][-1]
    proc = run("train.py", f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=4", "--eval_interval=2",
               without_hf=True)  # the run goes on as any other: without transformers
    assert "resuming from" in proc.stdout and "at iteration 2" in proc.stdout
    evals = [r for r in log(tmp_path) if "val_ce" in r]
    assert [r["iter"] for r in evals] == [0, 2, 4] and evals[1] == at_2  # evaluated again at 2, logged once


def test_a_conflicting_shape_and_an_unreachable_hub_name_are_one_sentence(exported, tmp_path):
    conflict = start("train.py", f"--out_dir={tmp_path}", f"--init_from={exported['llama']}", *TINY, "--n_layer=3")
    offline = start("sample.py", "--init_from=gtp2", env={"HF_HUB_OFFLINE": "1"})  # a typo, and no hub to ask
    one_sentence(finish(conflict, check=False), "n_layer=3 conflicts with", "leave n_layer out")
    one_sentence(finish(offline, check=False), "cannot load 'gtp2'", "not a local Hugging Face model directory",
                 "check the name or path")


# -----------------------------------------------------------------------------
# sample.py streams BPE text without breaking characters; the core runs without transformers


FORCED_TEXT = " naïve café — 日本語 🙂🚀 ‘ok’\nsecond line: Ελληνικά"


@pytest.fixture(scope="module")
def forced_bpe(tmp_path_factory):
    """A checkpoint with GPT-2's vocabulary made to emit FORCED_TEXT after any one-token prompt; GPT-2's
    BPE splits its rare characters into several tokens each."""
    targets = gpt2_encoding().encode(FORCED_TEXT)
    distinct = sorted(set(targets))
    d = 2 * len(distinct)
    model = GPT(GPTConfig(vocab_size=50257, block_size=len(targets) + 1, n_layer=1, n_head=2, n_embd=d, bias=False))
    # blocks that add nothing; token t_j and position p point along directions u_j = e_2j - e_2j+1,
    # the position far more, so the output after position p is the p-th target, whatever the input
    with torch.no_grad():
        for p in model.transformer.h.parameters():
            p.zero_()
        model.transformer.wte.weight.normal_(0, 0.01)
        u = torch.zeros(len(distinct), d)
        u[range(len(distinct)), range(0, d, 2)], u[range(len(distinct)), range(1, d, 2)] = 1.0, -1.0
        model.transformer.wte.weight[distinct] = u
        model.transformer.wpe.weight.zero_()
        for p, t in enumerate(targets):
            model.transformer.wpe.weight[p] = 10 * u[distinct.index(t)]
    checkpoint = {"model": model.state_dict(), "optimizer": {}, "model_args": vars(model.config), "config": {},
                  "iter_num": 0, "rng": [], "meta": {"vocab_size": 50257, "tokenizer": "gpt2"}}
    out = tmp_path_factory.mktemp("forced")
    torch.save(checkpoint, out / "ckpt.pt")
    return str(out), targets


def test_sample_streams_bpe_text_whole_characters(forced_bpe):
    out_dir, targets = forced_bpe
    enc = gpt2_encoding()
    assert any("\ufffd" in enc.decode([t]) for t in targets)  # some tokens end inside a character
    proc = run("sample.py", f"--out_dir={out_dir}", "--start=A", "--num_samples=1",
               f"--max_new_tokens={len(targets)}", "--temperature=0", without_hf=True)
    assert proc.stdout == "A" + FORCED_TEXT + "\n---------------\n"  # printed piece by piece, never a half character
    assert f"{len(targets)} tokens in" in proc.stderr and "tokens/s" in proc.stderr


def test_export_of_a_bpe_checkpoint(forced_bpe, tmp_path):
    """GPT-2 BPE checkpoints export with vocab.json and merges.txt too; transformers' greedy generate
    then writes the same text."""
    out_dir, targets = forced_bpe
    argv = sys.argv
    try:
        sys.argv = ["export.py", f"--out_dir={out_dir}", f"--to={tmp_path / 'hf'}"]
        export.main()
    finally:
        sys.argv = argv
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= set(os.listdir(tmp_path / "hf"))
    from tokenizers import Tokenizer, models, pre_tokenizers
    slow_files = Tokenizer(models.BPE.from_file(str(tmp_path / "hf" / "vocab.json"), str(tmp_path / "hf" / "merges.txt")))
    slow_files.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert slow_files.encode(FORCED_TEXT).ids == targets
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = tokenizer("A", return_tensors="pt")["input_ids"]
    generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(targets),
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tokenizer.decode(generated[0]) == "A" + FORCED_TEXT


def test_the_block_of_the_optional_packages_is_real():
    """The fixture's training runs and the sample runs above go through this block: model.py, mile.py,
    train.py and sample.py ran there without transformers, safetensors, tokenizers or huggingface_hub."""
    proc = subprocess.run([sys.executable, "-c", BLOCK_HF + "import transformers"], capture_output=True, text=True)
    assert proc.returncode != 0 and "import of transformers halted" in proc.stderr, proc.stderr


# -----------------------------------------------------------------------------
# lm-evaluation-harness on an exported model, offline, on a task file written here

def test_lm_eval_scores_an_exported_model_offline(exported, trained, tmp_path, monkeypatch):
    """lm-evaluation-harness (its Python API: the same as `lm_eval --model hf ...` without indexing its
    thousands of built-in tasks) on a multiple-choice task of three items: its log-likelihoods are ours."""
    # no hub: the datasets library reads these when lm_eval first imports it
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}.items():
        monkeypatch.setenv(key, value)
    lm_eval = pytest.importorskip("lm_eval", reason="pip install -r requirements-hf.txt")
    from lm_eval.tasks import TaskManager
    items = [{"question": "ROMEO:", "choices": ["I will", "xq zz", "!!!"], "answer": 0},
             {"question": "JULIET:\nO Romeo,", "choices": ["Romeo", "Qx", "3;;"], "answer": 0},
             {"question": "First Citizen:\nWe are", "choices": ["all", "zZ", "&&"], "answer": 1}]
    with open(tmp_path / "items.jsonl", "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    (tmp_path / "nanomile_mc.yaml").write_text(
        "task: nanomile_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={exported['gpt2']},dtype=float32,prefix_token_id=0", tasks=["nanomile_mc"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), device="cpu", batch_size=1,
        log_samples=True, random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None)
    samples = sorted(results["samples"]["nanomile_mc"], key=lambda s: s["doc_id"])
    loglikelihoods = [[r[0][0] for r in s["resps"]] for s in samples]

    # the same scores from our model: log p(" " + choice | question), summed over its characters
    model, checkpoint = checkpoint_model(trained["gpt2"])
    stoi = checkpoint["meta"]["stoi"]
    ours = []
    for item in items:
        context = [stoi[c] for c in item["question"]]
        row = []
        for choice in item["choices"]:
            ids = torch.tensor([context + [stoi[c] for c in " " + choice]])
            with torch.no_grad():
                logp = torch.log_softmax(ours_logits(model, ids[:, :-1]), dim=-1)[0]
            row.append(sum(logp[t - 1, ids[0, t]].item() for t in range(len(context), ids.size(1))))
        ours.append(row)
    # log-probabilities of a few characters each, summed, from logits that sum the model's terms each
    tol = sum_tolerance(2 * (4 * 32 + 32 + 128) + 32 + 84) * max(abs(x) for x in sum(ours, []))
    assert sum(loglikelihoods, []) == pytest.approx(sum(ours, []), abs=tol)
    our_acc = sum(row.index(max(row)) == item["answer"] for row, item in zip(ours, items)) / len(items)
    assert results["results"]["nanomile_mc"]["acc,none"] == pytest.approx(our_acc)
