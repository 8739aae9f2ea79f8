"""The cases of ``test_sharding.py``, run once unsharded (in the test process) and once per rank of
a TP=2 gloo group (this file as a script: ``python _tp_worker.py RANK WORLD PORT SPEC OUT``).

``run_cases(spec, shard)`` loads each checkpoint, applies ``shard`` (identity for TP=1) and returns
a dict of tensors and token ids keyed by case name; the test compares the dicts.
"""

from __future__ import annotations

import json
import sys
from typing import Callable

import torch

from _helpers import MASK_ID, drafter_config, prompts, randomize
from dspark.drafter_service.registry import build_drafter
from dspark.platform.config import TargetConfig
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.target.loading import FrozenTarget, load_target
from dspark.scheduler.policies import FixedPolicy
from dspark.verifier_service.engine import VerifierEngine

Shard = Callable[[FrozenTarget], FrozenTarget]


def _target(spec: dict, arch: str, shard: Shard) -> FrozenTarget:
    return shard(load_target(TargetConfig(path=spec["ckpts"][arch]), with_tokenizer=False))


def _requests(vocab: int, sampled: bool) -> list[GenerationRequest]:
    """Mixed prompt lengths (one longer than the prefill chunk), more requests than slots."""
    ps = prompts(vocab, [5, 17, 1, 9, 12], seed=4)
    reqs = []
    for i, p in enumerate(ps):
        params = SamplingParams(max_tokens=7 + i, ignore_eos=True)
        if sampled and i % 2:
            params = SamplingParams(max_tokens=7 + i, temperature=0.8, top_k=50, seed=100 + i, ignore_eos=True)
        reqs.append(GenerationRequest(f"r{i}", tuple(p), params))
    return reqs


def _generate(t: FrozenTarget, *, sampled: bool, drafter: bool) -> dict[str, list[int]]:
    d = None
    if drafter:
        torch.manual_seed(0)
        d = build_drafter(drafter_config("dspark-vanilla"), t, mask_token_id=MASK_ID)
        randomize(d, 0)
    eng = VerifierEngine(t, d, FixedPolicy() if d is not None else None, max_batch_size=3, prefill_chunk=8)
    out = eng.generate(_requests(t.vocab_size, sampled))
    if drafter:
        assert sum(o.stats.drafted for o in out.values()) > 0 and eng.total_fallback_steps == 0
    return {k: list(v.token_ids) for k, v in sorted(out.items())}


def run_cases(spec: dict, shard: Shard) -> dict:
    res: dict = {}
    g = torch.Generator().manual_seed(1)
    for arch in spec["logit_archs"]:
        t = _target(spec, arch, shard)
        ids = torch.randint(2, t.vocab_size, (3, 7), generator=g)  # [batch, seq], odd on purpose
        out = t(ids, use_cache=False)
        res[f"logits/{arch}"] = out.logits.float()  # [3, 7, V]
        res[f"features/{arch}"] = out.features.float()  # [3, 7, L*D]
        res[f"layer_params/{arch}"] = sum(p.numel() for p in t.layers.parameters())
    for arch in spec["engine_archs"]:
        t = _target(spec, arch, shard)
        res[f"greedy/{arch}"] = _generate(t, sampled=False, drafter=False)
        if arch == "qwen3":
            res[f"sampled/{arch}"] = _generate(t, sampled=True, drafter=False)
            res[f"drafter-greedy/{arch}"] = _generate(t, sampled=False, drafter=True)
            res[f"drafter-sampled/{arch}"] = _generate(t, sampled=True, drafter=True)
    return res


def main(rank: int, world: int, port: int, spec_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from dspark.verifier_service.tp.sharding import shard_target

    torch.set_num_threads(1)
    spec = json.loads(open(spec_path).read())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = run_cases(spec, lambda t: shard_target(t, rank, world))
        torch.save(res, out_path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
