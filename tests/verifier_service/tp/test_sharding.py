"""Tensor-parallel sharding without Ray: two gloo processes (``_tp_worker.py``) shard the tiny
checkpoints and run the same cases as the unsharded model in this process. Logits and features
match TP=1 (float32, up to reassociation); greedy and seeded-sampled generation through the
verifier engine, with and without a colocated drafter, emit exactly TP=1's tokens; both ranks
agree bit for bit. Head counts that do not divide are refused before anything changes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import tiny_hf_config
from dspark.platform.config import TargetConfig
from dspark.platform.target.loading import FrozenTarget, load_target
from dspark.verifier_service.tp.sharding import RowParallelLinear, shard_target, tp_info

HERE = Path(__file__).parent
WORLD = 2
LOGIT_ARCHS = ["qwen3", "qwen3_moe", "deepseek_v3", "llama_bias"]
ENGINE_ARCHS = ["qwen3", "qwen3_moe", "deepseek_v3"]


def _load_worker():
    spec = importlib.util.spec_from_file_location("_tp_worker", HERE / "_tp_worker.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _biased_llama(path: Path) -> Path:
    """Llama with attention and MLP biases, all drawn non-zero (they start at zero)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config("llama")
    cfg.attention_bias = cfg.mlp_bias = True
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tiny_checkpoints, tmp_path_factory):
    """(TP=1 results, [rank 0 results, rank 1 results]); the ranks run while TP=1 runs here."""
    tmp = tmp_path_factory.mktemp("tp")
    ckpts = {a: str(p) for a, p in tiny_checkpoints.items()}
    ckpts["llama_bias"] = str(_biased_llama(tmp / "llama_bias"))
    spec = {"ckpts": ckpts, "logit_archs": LOGIT_ARCHS, "engine_archs": ENGINE_ARCHS}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "_tp_worker.py"), str(r), str(WORLD), str(port),
                          str(tmp / "spec.json"), str(tmp / f"rank{r}.pt")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    try:
        reference = _load_worker().run_cases(spec, lambda t: t)
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return reference, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("arch", LOGIT_ARCHS)
def test_sharded_logits_and_features_match_tp1(arch, results):
    ref, ranks = results
    for key in (f"logits/{arch}", f"features/{arch}"):
        torch.testing.assert_close(ranks[0][key], ref[key], rtol=1e-5, atol=1e-5)
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks disagree on {key}"
    # the ranks really ran split layers: less than the full decoder each, together about all of it
    n_ref, n0, n1 = (res[f"layer_params/{arch}"] for res in (ref, *ranks))
    assert n0 == n1 < 0.75 * n_ref and n0 + n1 > n_ref


@pytest.mark.parametrize("case", ["greedy/qwen3", "greedy/qwen3_moe", "greedy/deepseek_v3", "sampled/qwen3",
                                  "drafter-greedy/qwen3", "drafter-sampled/qwen3"])
def test_engine_tokens_match_tp1(case, results):
    ref, ranks = results
    assert ranks[0][case] == ref[case]
    assert ranks[1][case] == ref[case]
    assert len(ref[case]) == 5 and all(len(v) >= 7 for v in ref[case].values())


@pytest.fixture
def qwen3(tiny_checkpoints) -> FrozenTarget:
    return load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)


@pytest.mark.parametrize("world,bad", [(3, "3 does not divide 4"), (4, "4 does not divide 2")])
def test_heads_must_divide(world, bad, qwen3):
    shapes = {n: tuple(p.shape) for n, p in qwen3.model.named_parameters()}
    with pytest.raises(ValueError, match=rf"query heads \(4\) and the key/value heads \(2\); {bad}"):
        shard_target(qwen3, 0, world)
    assert {n: tuple(p.shape) for n, p in qwen3.model.named_parameters()} == shapes  # untouched
    assert tp_info(qwen3) is None


def test_trivial_and_misuse(qwen3):
    assert shard_target(qwen3, 0, 1) is qwen3 and tp_info(qwen3) is None  # TP=1: nothing to do
    with pytest.raises(ValueError, match="rank 2 outside"):
        shard_target(qwen3, 2, 2)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="initialise torch.distributed"):
            shard_target(qwen3, 0, 2)
    assert not any(isinstance(m, RowParallelLinear) for m in qwen3.model.modules())
