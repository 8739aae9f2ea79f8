"""The offline target-feature cache: the size estimate is the bytes written (up to the files'
headers), cached features equal a fresh target forward of each record, an interrupted write
resumes byte-identically, and a cache is tied to its data set and target."""

from __future__ import annotations

import json

import pytest
import torch

from _data_helpers import data_config, quiet_generate
from dspark.platform.config import TargetConfig
from dspark.platform.target.loading import load_target
from dspark.platform.training import feature_cache as fc
from dspark.platform.training.data_io import DataError
from dspark.platform.training.dataset import TrainData
from dspark.platform.training.feature_cache import (
    FeatureCache,
    estimate_feature_cache_bytes,
    plan_shards,
    write_feature_cache,
)


@pytest.fixture(scope="module")
def demo(tiny_demo_target):
    return load_target(TargetConfig(path=str(tiny_demo_target.path)))


@pytest.fixture(scope="module")
def data_dir(demo, tiny_demo_target, tmp_path_factory):
    out = tmp_path_factory.mktemp("fc-data")
    quiet_generate(data_config(tiny_demo_target.path, out), demo, tiny_demo_target.path)
    return out


def write(data_dir, target, out, shard_bytes, **kw):
    return write_feature_cache(data_dir, target, out, shard_bytes, progress=False, log=lambda m: None, **kw)


def row_bytes(target, itemsize):
    return (target.feature_dim + target.hidden_size) * itemsize


def test_plan_and_estimate_are_pure_arithmetic():
    assert plan_shards([4, 4, 4], row_bytes=10, shard_bytes=100) == [(0, 1), (1, 2), (2, 3)]
    assert plan_shards([4, 4, 4], row_bytes=10, shard_bytes=120) == [(0, 2), (2, 3)]  # 80 + 24 bytes fit
    assert plan_shards([50, 1], row_bytes=10, shard_bytes=100) == [(0, 1), (1, 2)]  # an oversize record alone
    # 10 tokens * (3 + 2) * 2 bytes + 2 records * 16 bytes + 8 bytes of the offsets' extra entry
    assert estimate_feature_cache_bytes([4, 6], 3, 2, "bfloat16", shard_bytes=1 << 20) == 100 + 32 + 8
    assert estimate_feature_cache_bytes([4, 6], 3, 2, "float32", shard_bytes=1 << 20) == 200 + 32 + 8
    with pytest.raises(DataError, match="cache dtype"):
        estimate_feature_cache_bytes([4], 3, 2, "int8")


def test_estimate_equals_bytes_written_and_features_equal_a_fresh_forward(demo, data_dir, tmp_path):
    data = TrainData(data_dir)
    shard = 6 * row_bytes(demo, 4) * 12  # room for ~ two records per shard
    est = estimate_feature_cache_bytes(data.lengths, demo.feature_dim, demo.hidden_size, "float32", shard)
    m = write(data_dir, demo, tmp_path, shard, dtype="float32", batch_size=3)
    files = sorted(tmp_path.glob("features-*.safetensors"))
    assert m["complete"] and len(files) == len(m["shards"]) >= 3
    written = sum(f.stat().st_size for f in files)
    assert m["estimate_bytes"] == est and [s["bytes"] for s in m["shards"]] == [f.stat().st_size for f in files]
    assert 0 <= written - est <= 512 * len(files)  # only the safetensors JSON headers on top
    cache = FeatureCache(tmp_path, data)
    assert len(cache) == len(data)
    for i in range(len(data)):
        ids = torch.from_numpy(data[i].input_ids.astype("int64"))[None]  # [1, T]
        ref = demo(ids, logits_positions=None)
        feats, hidden = cache.get(i)
        assert feats.shape == (ids.shape[1], demo.feature_dim) and feats.dtype == torch.float32
        torch.testing.assert_close(feats, ref.features[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden, ref.last_hidden[0], rtol=1e-5, atol=1e-5)
    # negative control: records are not interchangeable
    assert not torch.allclose(cache.get(0)[1][:4], cache.get(1)[1][:4])
    b = data.collate([2, 0])
    f, h = cache.batch(b.index.tolist(), b.input_ids.shape[1])
    assert f.shape == (2, b.input_ids.shape[1], demo.feature_dim) and h.shape[:2] == b.input_ids.shape
    assert (f[b.attention_mask == 0] == 0).all() and torch.equal(h[1, : len(data[0].input_ids)], cache.get(0)[1])


def test_bfloat16_cache_halves_the_bytes(demo, data_dir, tmp_path):
    data = TrainData(data_dir)
    m = write(data_dir, demo, tmp_path, 1 << 30)  # default dtype bfloat16, one shard
    assert len(m["shards"]) == 1
    assert m["estimate_bytes"] == data.num_tokens * row_bytes(demo, 2) + 16 * len(data) + 8
    feats, hidden = FeatureCache(tmp_path).get(3)
    ref = demo(torch.from_numpy(data[3].input_ids.astype("int64"))[None], logits_positions=None)
    assert feats.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.float(), ref.last_hidden[0], rtol=2e-2, atol=2e-2)


def test_interrupted_cache_resumes_to_identical_files(demo, data_dir, tmp_path, monkeypatch):
    shard = 6 * row_bytes(demo, 2) * 12
    full = write(data_dir, demo, tmp_path / "full", shard)
    real = fc._forward_records
    calls = []

    def dying(*a, **kw):
        calls.append(a[2:4])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(fc, "_forward_records", dying)
    with pytest.raises(KeyboardInterrupt):
        write(data_dir, demo, tmp_path / "cut", shard)
    part = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert not part["complete"] and len(part["shards"]) == 2
    with pytest.raises(DataError, match="incomplete"):
        FeatureCache(tmp_path / "cut")
    calls.clear()
    monkeypatch.setattr(fc, "_forward_records", lambda *a, **kw: (calls.append(a[2:4]), real(*a, **kw))[1])
    resumed = write(data_dir, demo, tmp_path / "cut", shard)
    assert len(calls) == len(full["shards"]) - 2  # finished shards were not recomputed
    assert resumed["shards"] == full["shards"]
    for s in full["shards"]:
        assert (tmp_path / "cut" / s["file"]).read_bytes() == (tmp_path / "full" / s["file"]).read_bytes()


def test_cache_is_tied_to_its_data_and_target(demo, data_dir, tmp_path, tiny_checkpoints, tiny_demo_target):
    write(data_dir, demo, tmp_path / "c", 1 << 30)
    with pytest.raises(DataError, match=r"dtype: \"bfloat16\" -> \"float32\".*--force"):
        write(data_dir, demo, tmp_path / "c", 1 << 30, dtype="float32")
    other = load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)
    with pytest.raises(DataError, match="is not the one that generated"):
        write(data_dir, other, tmp_path / "o", 1 << 30)
    with pytest.raises(DataError, match="its own directory"):
        write(data_dir, demo, data_dir, 1 << 30)
    # a cache of another data set is refused by the reader
    other_data = tmp_path / "d2"
    quiet_generate(data_config(tiny_demo_target.path, other_data, "sampling.seed=5"), demo, tiny_demo_target.path)
    with pytest.raises(DataError, match="another data set"):
        FeatureCache(tmp_path / "c", TrainData(other_data))
    FeatureCache(tmp_path / "c", TrainData(data_dir))  # its own data set is accepted
