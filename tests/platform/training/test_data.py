"""Training-data generation and reading on the tiny demo target: records are prompt + the
target's own answer with the loss mask on exactly the answer; answers equal the target's greedy
``generate`` at temperature 0 and do not depend on engine batching when sampled; interrupted runs
resume byte-identically; other settings are refused; the reader's order is deterministic,
rank-disjoint and resumable mid-epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from _data_helpers import TINY_SOURCE, data_config, quiet_generate, shard_bytes
from dspark.platform.config import TargetConfig
from dspark.platform.target.loading import load_target
from dspark.platform.training.data import answer_seed, build_record, iter_prompts, scan_prompts
from dspark.platform.training.data_io import DataError
from dspark.platform.training.dataset import TrainData
from dspark.platform.training.prompts import Prompt, PromptSourceError, jsonl_prompts
from dspark.verifier_service.engine import VerifierEngine


@pytest.fixture(scope="module")
def demo(tiny_demo_target):
    return load_target(TargetConfig(path=str(tiny_demo_target.path)))


@pytest.fixture(scope="module")
def ref(demo, tiny_demo_target, tmp_path_factory):
    """One complete data set with the tiny settings (sampled at T=0.7, shards of 2)."""
    out = tmp_path_factory.mktemp("ref-data")
    cfg = data_config(tiny_demo_target.path, out)
    return cfg, quiet_generate(cfg, demo, tiny_demo_target.path)


def read_records(directory) -> list[dict]:
    m = json.loads((directory / "manifest.json").read_text())
    return [r for s in m["shards"] for r in pq.read_table(directory / s["file"]).to_pylist()]


# ------------------------------------------------------------------------------------- records
def test_records_are_prompt_plus_answer_with_mask_on_exactly_the_answer(ref, demo):
    cfg, m = ref
    out = cfg.output_dir
    prompts = list(iter_prompts(cfg, demo.tokenizer))
    recs = read_records(Path(out))
    assert m["complete"] and len(prompts) == 7
    assert [r["index"] for r in recs] == sorted(r["index"] for r in recs)  # index order across shards
    eos = set(m["eos_token_ids"])
    for r in recs:
        p = prompts[r["index"]]
        n = r["prompt_len"]
        assert (r["id"], r["source"]) == (p.id, p.source)
        assert tuple(r["input_ids"][:n]) == p.token_ids and n == len(p.token_ids)
        answer = r["input_ids"][n:]
        assert r["loss_mask"] == [0] * n + [1] * len(answer)
        assert cfg.min_loss_tokens <= len(answer) <= cfg.sampling.max_new_tokens
        # "stop" exactly when the answer ends in end-of-text, which is then a loss token
        assert (r["finish_reason"] == "stop") == (answer[-1] in eos)
        assert not eos & set(answer[:-1])
    c = m["counts"]
    assert c["records"] == len(recs) and c["records"] + c["skipped_too_long"] + c["dropped_short"] == 7
    assert c["tokens"] == sum(len(r["input_ids"]) for r in recs)
    assert c["loss_tokens"] == sum(sum(r["loss_mask"]) for r in recs)
    n = c["records"]
    assert n >= 5 and [s["records"] for s in m["shards"]] == [2] * (n // 2) + [1] * (n % 2)  # shard_size 2


def test_build_record_keeps_end_of_text_in_the_loss_and_drops_short_answers():
    p = Prompt("x", (5, 6, 7), "corpus:train")
    r = build_record(4, p, (9, 0), "stop", min_loss_tokens=2)  # 0 = end-of-text of the demo tokenizer
    assert r["input_ids"] == [5, 6, 7, 9, 0] and r["loss_mask"] == [0, 0, 0, 1, 1] and r["prompt_len"] == 3
    assert build_record(4, p, (9,), "stop", min_loss_tokens=2) is None
    assert build_record(4, p, (9, 8), None, min_loss_tokens=2)["finish_reason"] == "length"


def test_answer_seeds_are_per_prompt_and_in_range():
    seeds = {answer_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert answer_seed(0, 5) == answer_seed(0, 5) != answer_seed(1, 5)


def test_greedy_answers_equal_the_targets_own_generate(demo, tiny_demo_target, tmp_path):
    cfg = data_config(tiny_demo_target.path, tmp_path, "sampling.temperature=0", "sampling.max_new_tokens=12",
                      "min_loss_tokens=1")
    quiet_generate(cfg, demo, tiny_demo_target.path)
    recs = read_records(tmp_path)
    assert len(recs) == 7
    eos = demo.tokenizer.eos_token_id
    for r in recs:
        prompt = torch.tensor([r["input_ids"][: r["prompt_len"]]])
        ref = demo.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                                  eos_token_id=eos, pad_token_id=eos)[0, prompt.shape[1]:].tolist()
        if eos in ref:  # generate pads after end-of-text; the record stops there
            ref = ref[: ref.index(eos) + 1]
        assert r["input_ids"][r["prompt_len"]:] == ref, r["id"]


def test_sampled_records_do_not_depend_on_engine_batch_size(demo, tiny_demo_target, tmp_path, ref):
    _, m_ref = ref
    one = quiet_generate(data_config(tiny_demo_target.path, tmp_path / "b1", "batch_size=1"), demo, tiny_demo_target.path)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in m_ref["shards"]]  # batch 3 vs 1
    # negative control: another data seed gives other answers
    other = quiet_generate(data_config(tiny_demo_target.path, tmp_path / "s1", "sampling.seed=1"), demo,
                           tiny_demo_target.path)
    a, b = read_records(tmp_path / "b1"), read_records(tmp_path / "s1")
    assert [r["input_ids"][: r["prompt_len"]] for r in a] == [r["input_ids"][: r["prompt_len"]] for r in b]
    assert [r["input_ids"] for r in a] != [r["input_ids"] for r in b]
    assert other["complete"]


# ------------------------------------------------------------------------------------ resuming
def test_interrupted_run_resumes_to_byte_identical_shards(demo, tiny_demo_target, tmp_path, ref, monkeypatch):
    cfg_ref, m_ref = ref
    cfg = data_config(tiny_demo_target.path, tmp_path, "batch_size=2")
    real_step = VerifierEngine.step
    calls = {"step": 0, "add": 0}

    def dying_step(self):
        calls["step"] += 1
        if calls["step"] > 14:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(VerifierEngine, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        quiet_generate(cfg, demo, tiny_demo_target.path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert not m["complete"] and 1 <= len(m["shards"]) < len(m_ref["shards"])
    done = len(m["shards"])
    # debris of a crash: a shard renamed into place but never listed, and a temporary file
    (tmp_path / f"shard-{done:05d}.parquet").write_bytes(b"half")
    (tmp_path / "shard-00099.parquet.tmp-123").write_bytes(b"junk")
    monkeypatch.setattr(VerifierEngine, "step", real_step)
    real_add = VerifierEngine.add_request

    def counting_add(self, req):
        calls["add"] += 1
        return real_add(self, req)

    monkeypatch.setattr(VerifierEngine, "add_request", counting_add)
    with pytest.raises(DataError, match="incomplete"):
        TrainData(tmp_path)
    m2 = quiet_generate(cfg, demo, tiny_demo_target.path)
    assert m2["complete"] and calls["add"] == 7 - m["counts"]["prompts_done"]  # finished shards not redone
    assert shard_bytes(tmp_path) == shard_bytes(cfg_ref.output_dir)
    assert m2["counts"] == m_ref["counts"] and m2["shards"] == m_ref["shards"]
    assert not list(tmp_path.glob("*.tmp-*"))
    # a complete directory is left alone
    calls["add"] = 0
    assert quiet_generate(cfg, demo, tiny_demo_target.path)["shards"] == m_ref["shards"] and calls["add"] == 0


def test_an_altered_shard_is_regenerated(demo, tiny_demo_target, tmp_path, ref):
    _, m_ref = ref
    cfg = data_config(tiny_demo_target.path, tmp_path)
    quiet_generate(cfg, demo, tiny_demo_target.path)
    (tmp_path / "shard-00002.parquet").write_bytes(b"corrupt")
    m = quiet_generate(cfg, demo, tiny_demo_target.path)
    assert m["shards"] == m_ref["shards"] and shard_bytes(tmp_path)["shard-00002.parquet"] != b"corrupt"


def test_rerun_with_other_settings_or_target_is_refused_unless_forced(demo, tiny_demo_target, tmp_path):
    cfg = data_config(tiny_demo_target.path, tmp_path)
    quiet_generate(cfg, demo, tiny_demo_target.path)
    # engine batching is not part of the data's identity
    quiet_generate(data_config(tiny_demo_target.path, tmp_path, "batch_size=5"), demo, tiny_demo_target.path)
    with pytest.raises(DataError, match=r"sampling\.temperature: 0\.7 -> 0\.9.*--force"):
        quiet_generate(data_config(tiny_demo_target.path, tmp_path, "sampling.temperature=0.9"), demo,
                       tiny_demo_target.path)
    with pytest.raises(DataError, match="prompt list changed"):
        quiet_generate(data_config(tiny_demo_target.path, tmp_path, sources=[{**TINY_SOURCE, "seed": 3}]), demo,
                       tiny_demo_target.path)
    # another target: same path and config, other weights (simulated by the recorded fingerprint)
    mpath = tmp_path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["target"]["weights_hash"] = "0" * 16
    mpath.write_text(json.dumps(m))
    with pytest.raises(DataError, match="target: .*weights_hash"):
        quiet_generate(cfg, demo, tiny_demo_target.path)
    hot = data_config(tiny_demo_target.path, tmp_path, "sampling.temperature=0.9")
    m2 = quiet_generate(hot, demo, tiny_demo_target.path, force=True)
    assert m2["complete"] and m2["generation"]["sampling"]["temperature"] == 0.9


def test_prompts_too_long_for_max_length_are_skipped_and_counted(demo, tiny_demo_target, tmp_path):
    cfg = data_config(tiny_demo_target.path, tmp_path, "max_length=20", "min_loss_tokens=3")
    prompts = list(iter_prompts(cfg, demo.tokenizer))
    m = quiet_generate(cfg, demo, tiny_demo_target.path)
    too_long = sum(len(p.token_ids) > 20 - 3 for p in prompts)
    assert 0 < too_long < 7  # the setting exercises both paths
    assert m["counts"]["skipped_too_long"] == too_long
    recs = read_records(tmp_path)
    assert m["counts"]["records"] + m["counts"]["dropped_short"] == 7 - too_long == len(recs) + m["counts"]["dropped_short"]
    assert all(len(r["input_ids"]) <= 20 for r in recs)
    assert any(len(r["input_ids"]) == 20 and r["finish_reason"] == "length" for r in recs)  # answers cut to fit


def test_config_refuses_settings_that_drop_every_record(tiny_demo_target, tmp_path):
    from dspark.platform.config import ConfigError

    with pytest.raises(ConfigError, match="min_loss_tokens"):
        data_config(tiny_demo_target.path, tmp_path, "min_loss_tokens=11")  # > max_new_tokens (10)
    with pytest.raises(ConfigError, match="min_prompt_tokens must not exceed max_prompt_tokens"):
        data_config(tiny_demo_target.path, tmp_path, sources=[{**TINY_SOURCE, "min_prompt_tokens": 50}])
    with pytest.raises(ConfigError, match="unknown field"):
        data_config(tiny_demo_target.path, tmp_path, sources=[{**TINY_SOURCE, "colour": "blue"}])
    with pytest.raises(ConfigError, match="sources.0"):
        data_config(tiny_demo_target.path, tmp_path, sources=[{"kind": "parquet", "path": "x"}])
    with pytest.raises(ConfigError, match="sources"):
        data_config(tiny_demo_target.path, tmp_path, sources=[])


# --------------------------------------------------------------------------------------- JSONL
def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad, reason", [
    ('{"prompt": "x"', "not valid JSON"),
    ('["prompt"]', "expected a JSON object"),
    ('{"text": "x"}', "needs a 'prompt' string or a non-empty 'messages' list"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "has no user turn"),
    ('{"messages": [{"role": "user"}]}', "role (system/user/assistant) and string content"),
])
def test_bad_jsonl_lines_fail_before_generation_naming_the_line(demo, tiny_demo_target, tmp_path, bad, reason):
    f = write_lines(tmp_path / "p.jsonl", ['{"prompt": "import os\\n"}', "", bad])
    with pytest.raises(PromptSourceError) as err:
        list(jsonl_prompts(demo.tokenizer, f))
    assert f"{f}:3: " in str(err.value) and reason in str(err.value)
    cfg = data_config(tiny_demo_target.path, tmp_path / "out", sources=[{"kind": "jsonl", "path": str(f)}])
    with pytest.raises(PromptSourceError, match=":3: "):
        quiet_generate(cfg, demo, tiny_demo_target.path)
    assert not (tmp_path / "out" / "manifest.json").exists()  # nothing written


def test_undecodable_or_missing_jsonl_is_named(demo, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(PromptSourceError, match=rf"{f}:2: not UTF-8"):
        list(jsonl_prompts(demo.tokenizer, f))
    with pytest.raises(PromptSourceError, match="does not exist"):
        list(jsonl_prompts(demo.tokenizer, tmp_path / "nope.jsonl"))
    with pytest.raises(PromptSourceError, match="is not a file"):
        list(jsonl_prompts(demo.tokenizer, tmp_path))
    f.write_text('{"prompt": "x", "id": null}\n')
    with pytest.raises(PromptSourceError, match=rf"{f}:1: 'id' must be"):
        list(jsonl_prompts(demo.tokenizer, f))


def test_requests_the_engine_refuses_are_counted_not_fatal(demo, tiny_demo_target, tmp_path, monkeypatch):
    from dspark.verifier_service.engine import RequestRejected

    real_add = VerifierEngine.add_request

    def picky_add(self, req):
        if req.request_id in ("1", "4"):
            raise RequestRejected(f"request {req.request_id!r}: refused for the test")
        return real_add(self, req)

    monkeypatch.setattr(VerifierEngine, "add_request", picky_add)
    seen = []
    cfg = data_config(tiny_demo_target.path, tmp_path)
    from dspark.platform.training.data import generate_data

    m = generate_data(cfg, demo, tiny_demo_target.path, progress=False, log=seen.append)
    assert m["complete"] and m["counts"]["rejected"] == 2
    kept = {r["index"] for r in read_records(tmp_path)}
    assert kept.isdisjoint({1, 4}) and len(kept) + m["counts"]["dropped_short"] == 5
    assert any("refused for the test" in line for line in seen)


def test_jsonl_chat_and_completion_prompts(demo, tiny_demo_target, tmp_path):
    f = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"id": "chat-1", "messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "old answer"},
                                                 {"role": "user", "content": "write a loop"},
                                                 {"role": "assistant", "content": "never trained on"}]}),
        json.dumps({"prompt": "def main():\n"}),
        json.dumps({"prompt": "import sys\n"}),
    ])
    cfg = data_config(tiny_demo_target.path, tmp_path / "out", "min_loss_tokens=1",
                      sources=[{"kind": "jsonl", "path": str(f), "limit": 2}])
    assert scan_prompts(cfg, demo.tokenizer).total == 2
    quiet_generate(cfg, demo, tiny_demo_target.path)
    recs = read_records(tmp_path / "out")
    assert [r["id"] for r in recs] == ["chat-1", "p.jsonl:2"] and {r["source"] for r in recs} == {str(f)}
    chat = demo.tokenizer.decode(recs[0]["input_ids"][: recs[0]["prompt_len"]])
    assert chat == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nold answer<|im_end|>\n"
                    "<|im_start|>user\nwrite a loop<|im_end|>\n<|im_start|>assistant\n")
    assert recs[1]["input_ids"][: recs[1]["prompt_len"]] == demo.tokenizer("def main():\n").input_ids


# -------------------------------------------------------------------------------------- reader
def test_reader_matches_the_shards_and_pads_right(ref):
    cfg, m = ref
    data = TrainData(cfg.output_dir)
    recs = read_records(Path(cfg.output_dir))
    assert len(data) == len(recs) == m["counts"]["records"] and data.num_tokens == m["counts"]["tokens"]
    assert data.num_loss_tokens == m["counts"]["loss_tokens"]
    for i, r in enumerate(recs):
        assert data[i].input_ids.tolist() == r["input_ids"] and data[i].loss_mask.tolist() == r["loss_mask"]
    b = data.collate([3, 0, 5])
    lens = [len(recs[i]["input_ids"]) for i in (3, 0, 5)]
    assert b.input_ids.shape == b.loss_mask.shape == b.attention_mask.shape == (3, max(lens))
    assert all(t.dtype == torch.int64 for t in (b.input_ids, b.loss_mask, b.attention_mask, b.index))
    for row, (i, n) in enumerate(zip((3, 0, 5), lens)):
        assert b.input_ids[row, :n].tolist() == recs[i]["input_ids"]
        assert b.loss_mask[row, :n].tolist() == recs[i]["loss_mask"]
        assert b.attention_mask[row].tolist() == [1] * n + [0] * (max(lens) - n)
        assert (b.input_ids[row, n:] == m["pad_token_id"]).all() and (b.loss_mask[row, n:] == 0).all()
    capped = TrainData(cfg.output_dir, max_length=12).collate([0, 1, 2])
    assert capped.input_ids.shape[1] == 12 and capped.input_ids[0].tolist() == recs[0]["input_ids"][:12]


def test_batches_are_deterministic_per_seed_and_epoch(ref):
    data = TrainData(ref[0].output_dir)

    def order(**kw):
        return [b.index.tolist() for b in data.batches(2, **kw)]

    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1) != order(seed=2, epoch=1)  # 1/5040 to tie by chance
    again = TrainData(ref[0].output_dir)  # a fresh reader (another process) agrees
    assert [b.index.tolist() for b in again.batches(2, 1, 0)] == order(seed=1, epoch=0)


@pytest.mark.parametrize("world, batch", [(2, 2), (3, 2), (2, 3)])
def test_ranks_get_disjoint_equal_parts_and_drop_the_remainder(ref, world, batch):
    data = TrainData(ref[0].output_dir)  # 7 records
    parts = [[i for b in data.batches(batch, seed=0, epoch=4, rank=r, world_size=world) for i in b.index.tolist()]
             for r in range(world)]
    steps = len(data) // (batch * world)
    assert steps >= 1
    assert all(len(p) == steps * batch for p in parts)
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == len(flat) == steps * batch * world
    perm = data.order(0, 4).tolist()
    assert sorted(flat) == sorted(perm[: steps * batch * world])  # what is dropped is the permutation's tail


def test_start_step_resumes_the_exact_data_order(ref):
    data = TrainData(ref[0].output_dir)
    full = [b.index.tolist() for b in data.batches(1, seed=3, epoch=2, rank=1, world_size=2)]
    assert len(full) == len(data) // 2 >= 2
    for k in range(len(full) + 1):
        assert [b.index.tolist() for b in data.batches(1, seed=3, epoch=2, rank=1, world_size=2, start_step=k)] == full[k:]
    with pytest.raises(ValueError, match="start_step"):
        next(data.batches(1, seed=3, epoch=2, rank=1, world_size=2, start_step=len(full) + 1))
    with pytest.raises(DataError, match="fewer than one global batch"):
        next(data.batches(4, seed=0, epoch=0, world_size=2))
    with pytest.raises(ValueError, match="rank"):
        next(data.batches(1, seed=0, epoch=0, rank=2, world_size=2))


def test_reader_refuses_missing_or_foreign_directories(ref, tmp_path):
    with pytest.raises(DataError, match="no manifest.json"):
        TrainData(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="format"):
        TrainData(tmp_path)
    assert isinstance(np.asarray(TrainData(ref[0].output_dir).lengths), np.ndarray)
