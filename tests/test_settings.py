"""settings.py in this process: defaults, a config file then flags, every check a setting gets, the
names of earlier versions, and what a resumed run takes over from its checkpoint. Each refusal is one
sentence on stderr and exit status 1, as train.py shows it (tests/test_train.py runs a few end to end)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import settings  # noqa: E402
from settings import Settings  # noqa: E402


def refused(capsys, fn, *args):
    """The one line fn(*args) says on stderr as it stops with exit status 1."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_defaults_are_the_laptop_run():
    cfg, explicit = settings.parse([])
    assert cfg == Settings() and explicit == set()
    assert (cfg.loss, cfg.loss_path, cfg.dataset, cfg.n_layer, cfg.max_iters) == ("mile", "auto", "shakespeare_char", 4, 2000)
    settings.check(cfg)


def test_config_file_then_flags_in_order(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("import math\nmax_iters = 3\nloss = 'ce'\nlearning_rate = 1\nhelper = math.sqrt\n")
    cfg, explicit = settings.parse([str(cfg_file), "--loss=focal", "--gamma=2", "--compile=TRUE", "--dataset=a/b"])
    assert (cfg.max_iters, cfg.loss, cfg.gamma, cfg.compile, cfg.dataset) == (3, "focal", 2.0, True, "a/b")
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float  # an int is a fine float
    assert explicit == {"max_iters", "loss", "learning_rate", "gamma", "compile", "dataset"}


@pytest.mark.parametrize("args, needles", [
    (["--lerning_rate=1e-3"], ["unknown setting 'lerning_rate' in --lerning_rate=1e-3", "did you mean learning_rate",
                               "the valid keys are"]),
    (["--max_iters=ten"], ["max_iters in --max_iters=ten must be of type int (like 2000), not 'ten'"]),
    (["--max_iters=1.5"], ["max_iters", "must be of type int"]),
    (["--compile=maybe"], ["compile", "must be of type bool"]),
    (["--learning_rate=fast"], ["learning_rate", "must be of type float"]),
    (["--max_iters"], ["--max_iters has no value; write --max_iters=VALUE"]),
    (["no_such_config.py"], ["'no_such_config.py' is neither a --key=value setting nor a config file"]),
    (["--chunked_loss=True"], ["--chunked_loss is now --loss_path (auto, full or chunked)"]),
    (["--compile_loss=True"], ["--compile_loss is now --compile"]),
])
def test_bad_flags(capsys, args, needles):
    err = refused(capsys, settings.parse, args)
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("text, needles", [
    ("n_layers = 2\n", ["unknown setting 'n_layers' in", "did you mean n_layer"]),
    ("chunked_loss = 'auto'\n", ["chunked_loss in", "is now loss_path (auto, full or chunked)"]),
    ("max_iters = 1 / 0\n", ["does not run: ZeroDivisionError"]),
])
def test_bad_config_files(capsys, tmp_path, text, needles):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(text)
    err = refused(capsys, settings.parse, [str(cfg_file)])
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("key, value, needle", [
    ("loss", "mse", "loss must be one of ce, focal, mile, not 'mse'"),
    ("arch", "bert", "arch must be one of gpt2, llama"),
    ("loss_path", "maybe", "loss_path must be one of auto, full, chunked"),
    ("parallel", "tp", "parallel must be one of ddp, fsdp"),
    ("dtype", "fp8", "dtype must be one of auto, float32, bfloat16, float16"),
    ("eval_interval", 0, "eval_interval must be at least 1, not 0"),
    ("batch_size", -2, "batch_size must be at least 1"),
    ("loss_chunk_size", -5, "loss_chunk_size must not be negative, not -5"),
    ("checkpoint_interval", -1, "checkpoint_interval must not be negative"),
    ("gamma", -1.0, "gamma must not be negative"),
    ("n_embd", 33, "n_embd (33) must be a multiple of n_head (4)"),
    ("dropout", 1.0, "dropout must be at least 0 and below 1"),
    ("learning_rate", -1.0, "learning_rate must be positive, not -1.0"),
    ("learning_rate", 0.0, "learning_rate must be positive"),
    ("min_lr", -1e-4, "min_lr must be at least 0"),
    ("beta1", 2.0, "beta1 must be at least 0 and below 1, not 2.0"),
    ("beta2", 1.0, "beta2 must be at least 0 and below 1"),
    ("weight_decay", -0.1, "weight_decay must be at least 0"),
    ("grad_clip", -1.0, "grad_clip must be at least 0 (0 disables clipping)"),
    ("peak_flops_per_s", -1.0, "peak_flops_per_s must be at least 0"),
    ("sigma", -5.0, "sigma must be positive"),
    ("sigma", 0.0, "sigma must be positive"),
    ("seed", -5, "seed must be from 0 to 2**32 - 1"),
    ("seed", 2**32, "seed must be from 0 to 2**32 - 1"),
])
def test_bad_values(capsys, key, value, needle):
    cfg = Settings()
    setattr(cfg, key, value)
    assert needle in refused(capsys, settings.check, cfg)


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        settings.parse(["--max_iters=3", "-h"], "usage text\n")
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage text")
    assert all(f"{key}=" in out for key in settings.KEYS) and "max_iters=2000" in out  # the defaults


def test_a_resumed_run_keeps_its_settings():
    saved = {**vars(Settings()), "loss": "ce", "max_iters": 100, "device": "cuda", "out_dir": "elsewhere",
             "unknown_key_of_the_future": 1}
    cfg, explicit = settings.parse(["--max_iters=200", "--out_dir=here"])
    cfg = settings.resumed(cfg, saved, explicit)
    assert cfg.loss == "ce"  # from the checkpoint
    assert cfg.max_iters == 200 and cfg.out_dir == "here"  # given now
    assert cfg.device == "auto"  # this machine's, not the saving machine's
    # how it computed is kept too, unless given now, and the start-up line says which
    saved.update(parallel="fsdp", activation_checkpointing="full", compile=True)
    cfg, explicit = settings.parse(["--compile=False"])
    cfg = settings.resumed(cfg, saved, explicit)
    assert (cfg.parallel, cfg.activation_checkpointing, cfg.compile) == ("fsdp", "full", False)
    assert settings.resumed_line(cfg, saved, explicit) == \
        "as it ran: parallel=fsdp, activation_checkpointing=full; given now: compile=False"
    old = settings.resumed(Settings(), {"chunked_loss": False}, set())  # an earlier version's checkpoint
    assert old.loss_path == "full"


def test_renamed_flags_of_other_scripts(capsys):
    settings.refuse_renamed(["--out_dir=x", "--hf_name=y"], {"--hf": "--init_from"})  # a prefix is not the flag
    err = refused(capsys, settings.refuse_renamed, ["--start=a", "--hf=out/hf"], {"--hf": "--init_from"})
    assert err == "error: --hf is now --init_from\n"


def test_model_args_are_the_settings_of_the_model():
    cfg = Settings(arch="llama", n_layer=2, n_head=2, n_embd=16, n_ffn=40, block_size=8, loss="focal", gamma=2.0)
    args = settings.model_args(cfg, vocab_size=77)
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(**args))
    assert (model.config.vocab_size, model.config.n_ffn, model.config.loss, model.config.gamma) == (77, 40, "focal", 2.0)
    assert set(settings.SHAPE_KEYS) <= set(args)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "config"))))
def test_every_ready_config_is_valid(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", name)
    cfg, explicit = settings.parse([path])
    settings.check(cfg)
    assert explicit and cfg.out_dir != "out"  # each preset trains into a folder of its own


def test_a_smaller_micro_batch_keeps_the_configs_sequences_a_step(capsys, tmp_path):
    preset = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "paper_7b.py")
    cfg, _ = settings.parse([preset])
    sequences = cfg.batch_size * cfg.gradient_accumulation_steps
    for batch_size in (1, 2, 8):  # the accumulation follows
        cfg, _ = settings.parse([preset, f"--batch_size={batch_size}"])
        assert cfg.batch_size * cfg.gradient_accumulation_steps == sequences
    cfg, _ = settings.parse([preset, "--batch_size=2", "--gradient_accumulation_steps=8"])  # both given: as given
    assert (cfg.batch_size, cfg.gradient_accumulation_steps) == (2, 8)
    cfg, _ = settings.parse(["--batch_size=5"])  # no config set the accumulation: the laptop run's 1 stays
    assert (cfg.batch_size, cfg.gradient_accumulation_steps) == (5, 1)
    err = refused(capsys, settings.parse, [preset, "--batch_size=3"])
    assert f"batch_size=3 cannot keep the {sequences} sequences an optimizer step of the config" in err
    # a resumed run keeps the sequences a step it was saved with
    saved = {**vars(Settings()), "batch_size": 4, "gradient_accumulation_steps": 6}
    cfg, explicit = settings.parse(["--batch_size=2"])
    assert settings.resumed(cfg, saved, explicit).gradient_accumulation_steps == 12


def test_bpe_vocabularies_are_padded_to_64_characters_are_not():
    assert settings.padded(50257) == 50304 and settings.model_args(Settings(), 50257)["padded_vocab_size"] == 50304
    assert settings.padded(32000) == 0  # a multiple of 64 already
    assert settings.padded(65) == settings.padded(84) == 0  # Shakespeare's characters: as they are


def test_micro_batches_that_do_not_split_over_the_processes_name_a_split_that_does(capsys):
    cfg, _ = settings.parse(["--batch_size=4", "--gradient_accumulation_steps=6"])  # 24 sequences a step
    settings.split_over_processes(cfg, 2)  # 3 micro-batches each
    err = refused(capsys, settings.split_over_processes, cfg, 4)
    assert "gradient_accumulation_steps (6) must be a multiple of the number of processes (4)" in err
    assert "--gradient_accumulation_steps=8 --batch_size=3 keeps the 24 sequences of a step" in err
    cfg, _ = settings.parse(["--batch_size=5", "--gradient_accumulation_steps=1"])  # 5 sequences: no split over 2
    assert "keeps" not in refused(capsys, settings.split_over_processes, cfg, 2)
