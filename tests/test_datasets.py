"""Training data: weighted blends and splits through megatron-core's builder, the tokenizer check,
and the resumable sampler."""
import json
import os

import numpy as np
import pytest

from data_utils import write_random_dataset
from model_utils import tiny_args
from ssa_megatron.data.datasets import (ResumableSampler, build_datasets, parse_blend,
                                        read_tokenizer_info)
from ssa_megatron.model.config import ConfigError


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("blend")
    a = write_random_dataset(str(d / "a"), num_docs=120, seed=1)
    b = write_random_dataset(str(d / "b"), num_docs=120, seed=2)
    return a, b


def test_weighted_blend_draws_in_proportion(single_process_parallel_state, two_datasets):
    a, b = two_datasets
    args = tiny_args("--data-path", "0.7", a, "0.3", b, "--split", "90,10,0")
    info = read_tokenizer_info(parse_blend(args.data_path)[0], None)
    train, valid, test = build_datasets(args, info, [1000, 50, 0])
    assert len(train) >= 1000 and valid is not None and test is None
    counts = np.bincount(train.dataset_index[:1000], minlength=2)
    assert abs(counts[0] / 1000 - 0.7) < 0.02, counts
    sample = train[0]
    assert sample["tokens"].shape[0] == args.seq_length
    assert args.split == "90,10,0"  # the effective split is recorded for checkpoints


def test_tokenizer_mismatch_between_blended_datasets_is_refused(tmp_path, two_datasets):
    a, _ = two_datasets
    c = write_random_dataset(str(tmp_path / "c"), vocab_size=300, num_docs=20)
    with pytest.raises(ConfigError, match="different tokenizers"):
        read_tokenizer_info([a, c], None)


def test_vocab_size_flag_must_match_the_data(two_datasets):
    a, _ = two_datasets
    with pytest.raises(ConfigError, match="does not match the tokenizer"):
        read_tokenizer_info([a], 200)
    assert read_tokenizer_info([a], None).vocab_size == 256
    assert read_tokenizer_info([a], 1000).vocab_size == 1000  # imported embeddings may be larger


def test_missing_data_and_bad_blends_fail_clearly(tmp_path, single_process_parallel_state):
    with pytest.raises(ConfigError, match="does not exist: build it with tools/preprocess_data.py"):
        build_datasets(tiny_args("--data-path", str(tmp_path / "nothing")), None, [10, 0, 0])
    with pytest.raises(ConfigError, match="weight/prefix pairs"):
        parse_blend(["0.5", "a", "b"])


def test_empty_requested_split_is_refused(single_process_parallel_state, tmp_path):
    tiny = write_random_dataset(str(tmp_path / "tiny"), num_docs=5)
    args = tiny_args("--data-path", tiny, "--split", "99,1,0")
    info = read_tokenizer_info([tiny], None)
    with pytest.raises(ConfigError, match="leaves the valid split"):
        build_datasets(args, info, [10, 10, 0])


def test_sampler_resumes_at_the_exact_next_sample():
    full = [i for batch in ResumableSampler(40, 0, 2, 1, 2) for i in batch]
    resumed = [i for batch in ResumableSampler(40, 12, 2, 1, 2) for i in batch]
    assert full[:4] == [2, 3, 6, 7]
    assert resumed == full[6:]  # 12 consumed = 3 global steps of 4; rank 1 read 6 of them


def test_a_dataset_rebuilt_under_the_same_prefix_gets_new_sample_indices(single_process_parallel_state,
                                                                        tmp_path):
    """megatron-core caches the sample indices next to the data; after the prefix is rebuilt with
    fewer documents the old cache used to be reused (IndexError, or the old samples)."""
    prefix = write_random_dataset(str(tmp_path / "d"), num_docs=200, seed=1)
    args = tiny_args("--data-path", prefix, "--split", "100,0,0")
    info = read_tokenizer_info([prefix], None)
    first = build_datasets(args, info, [200, 0, 0])[0]
    write_random_dataset(prefix, num_docs=12, seed=2)  # rebuilt: another corpus, same prefix
    again = build_datasets(tiny_args("--data-path", prefix, "--split", "100,0,0"), info, [200, 0, 0])[0]
    assert again.unique_description_hash != first.unique_description_hash
    for i in range(200):
        again[i]  # every sample index points into the rebuilt data


def test_synthetic_records_are_the_versioned_format_and_old_flat_ones_still_read(tmp_path):
    """Benchmarks, fault injection and these tests write the dataset record through
    data/metadata.py (kind "synthetic", with the token count the index check compares); a flat
    record of an earlier version still reads."""
    from ssa_megatron.data.datasets import check_data_files
    from ssa_megatron.data.metadata import FORMAT, read_metadata
    prefix = write_random_dataset(str(tmp_path / "syn"), num_docs=30)
    record = read_metadata(prefix)
    assert record["format"] == FORMAT and record["version"] == 1 and record["tokenizer"]["kind"] == "synthetic"
    check_data_files([prefix])  # the recorded token count matches the index
    with open(prefix + ".tokenizer.json") as f:
        wrong = json.load(f)
    wrong["dataset"]["tokens"] += 1
    with open(prefix + ".tokenizer.json", "w") as f:
        json.dump(wrong, f)
    with pytest.raises(ConfigError, match="records"):
        check_data_files([prefix])
    with open(prefix + ".tokenizer.json", "w") as f:  # what earlier versions wrote
        json.dump({"kind": "synthetic", "vocab_size": 256, "eod": 255, "sha256": "none"}, f)
    info = read_tokenizer_info([prefix], None)
    assert (info.vocab_size, info.eod) == (256, 255)
    check_data_files([prefix])


def test_a_data_path_with_its_extension_names_the_prefix(tmp_path):
    from ssa_megatron.data.datasets import check_data_files
    prefix = write_random_dataset(str(tmp_path / "d"), num_docs=5)
    for ext in (".bin", ".idx"):
        with pytest.raises(ConfigError, match=f"pass the dataset prefix {prefix} \\(without \\{ext}\\)"):
            check_data_files([prefix + ext])
