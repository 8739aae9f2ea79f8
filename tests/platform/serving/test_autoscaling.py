"""Serve autoscaling from our config, for real: a verifier deployment with
``autoscaling: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 1, upscale_delay_s: 0}``
starts with one replica and gets a second under a load of concurrent streams, and every stream
still returns the target's own greedy text (each new replica measures nothing and serves at once:
plain decoding keeps the start-up short)."""

from __future__ import annotations

import asyncio
import time

import pytest

from _helpers import wait_http

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PORT = 8435
MAX_LEN = 160


def _running(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def test_verifier_replicas_scale_up_under_load(tiny_demo_target):
    import openai
    import ray
    from ray import serve

    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.platform.serving.app import app_builder
    from dspark.platform.target.loading import load_target
    from dspark.platform.config import TargetConfig
    from dspark.verifier_service.engine import VerifierEngine

    path = str(tiny_demo_target.path)
    target = load_target(TargetConfig(path=path), path)
    prompts = [f"def f{i}(x):\n" for i in range(12)]
    eng = VerifierEngine(target, None, max_batch_size=12, max_model_len=MAX_LEN)
    reqs = [GenerationRequest(str(i), tuple(target.tokenizer(p, add_special_tokens=False)["input_ids"]),
                              SamplingParams(max_tokens=96, ignore_eos=True)) for i, p in enumerate(prompts)]
    outs = eng.generate(reqs)
    wants = [target.tokenizer.decode(list(outs[str(i)].token_ids), skip_special_tokens=True) for i in range(len(prompts))]

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        args = {"model_name": "tiny", "target": {"path": path}, "drafter_path": None, "use_scheduler": False,
                "engine": {"max_batch_size": 4, "max_model_len": MAX_LEN}, "policy": {"name": "off"},
                "verifier": {"num_cpus": 0.2, "max_ongoing_requests": 4,
                             "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                             "upscale_delay_s": 0, "downscale_delay_s": 600}},
                "ingress_deployment": {"num_cpus": 0.1}}
        serve.run(app_builder(args), name="auto", route_prefix="/a", blocking=False)
        wait_http(f"http://127.0.0.1:{PORT}/a/health")
        assert _running("auto", "VerifierReplica") == 1
        peak = 0

        async def run():
            nonlocal peak
            c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{PORT}/a/v1", api_key="x", max_retries=0, timeout=180)

            async def one(p):
                s = await c.completions.create(model="tiny", prompt=p, max_tokens=96, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
                return "".join([ch.choices[0].text async for ch in s if ch.choices])

            async def watch(task):
                nonlocal peak
                while not task.done():
                    peak = max(peak, _running("auto", "VerifierReplica"))
                    await asyncio.sleep(0.5)

            # two waves: the second finds the replica Serve started for the first
            got = []
            for wave in (prompts[:6], prompts[6:]):
                task = asyncio.ensure_future(asyncio.gather(*(one(p) for p in wave)))
                await watch(task)
                got += task.result()
            return got

        got = asyncio.run(run())
        deadline = time.time() + 60
        while peak < 2 and time.time() < deadline:  # a replica may come up just after the load
            peak = max(peak, _running("auto", "VerifierReplica"))
            time.sleep(0.5)
        assert got == wants
        assert peak == 2
    finally:
        serve.shutdown()
        ray.shutdown()
