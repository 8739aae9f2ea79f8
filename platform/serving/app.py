"""The Ray Serve application: ``Ingress`` (OpenAI-compatible HTTP) -> ``VerifierReplica`` (the
engine's step loop) -> ``DraftWorker`` (disaggregated drafting). Thin shims: the logic lives in
``openai_api`` (HTTP shapes), ``replica_setup`` (building an engine), ``verifier_service.replica``
(the step loop) and ``drafter_service.worker`` / ``remote`` (draft sessions).

``app_builder(args)`` is the import path for ``serve run``/``serve deploy`` and ``dspark serve``:
``args`` is a :class:`~dspark.platform.serving.config.ServeConfig` mapping.
"""


import concurrent.futures
import hmac
import logging
import os
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from dspark.platform.contracts import DraftCall, DraftReply, GenerationRequest, RequestOutput
from dspark.platform.serving import openai_api as oai
from dspark.platform.serving.config import DEPLOYMENT_NAMES, ServeConfig
from dspark.platform.observability.recorders import IngressMetrics, LoopMetrics, StepMetrics, serve_tags

__all__ = ["app_builder", "Ingress", "VerifierReplica", "DraftWorker"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- draft worker
@serve.deployment(name=DEPLOYMENT_NAMES["draft_worker"])
class DraftWorker:
    """Draft sessions of the verifier replicas (``drafter_service.worker.DraftWorkerCore``). A
    replica's calls carry its session as the multiplexed model id, so Serve routes them to the
    worker that holds the session."""

    def __init__(self, args: dict):
        from dspark.drafter_service.worker import DraftWorkerCore
        from dspark.platform.serving.replica_setup import build_draft_factory

        self.cfg = ServeConfig.model_validate(args)
        self.core = DraftWorkerCore(build_draft_factory(self.cfg), max_sessions=16)

    @serve.multiplexed(max_num_models_per_replica=16)
    async def _session(self, session: str) -> str:
        return session  # the state lives in the core; this registers the id for routing

    async def call(self, call: DraftCall) -> DraftReply:
        await self._session(serve.get_multiplexed_model_id())
        return self.core.call(call)


# ----------------------------------------------------------------------------------------- verifier
@serve.deployment(name=DEPLOYMENT_NAMES["verifier"])
class VerifierReplica:
    def __init__(self, args: dict, draft_handle: Any = None):
        from dspark.platform.serving.replica_setup import ServeDraftTransport, build_engine, resolve_target
        from dspark.verifier_service.replica import ReplicaLoop

        self.cfg = cfg = ServeConfig.model_validate(args)
        self.session = f"replica-{uuid.uuid4().hex[:12]}"
        transport = None
        if draft_handle is not None:
            transport = ServeDraftTransport(draft_handle, self.session, cfg.draft_timeout_s)

        # off the replica's event loop: measuring the profile calls the draft worker synchronously
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            self.engine = pool.submit(build_engine, cfg, draft_transport=transport, session=self.session).result()
        self.model_path = str(resolve_target(cfg))
        self.client = self._scheduler_client() if cfg.use_scheduler and self.engine.drafter is not None else None
        before = None
        if self.client is not None:
            def before(engine, client=self.client):
                engine.verify_budget = client.current_budget()
        # metrics (platform/observability), tagged with the session: the id the scheduler knows it by
        obs_tags = {**serve_tags(), "replica": self.session}
        self.engine.add_observer(StepMetrics(obs_tags))
        self.loop = ReplicaLoop(self.engine, before_step=before, name=self.session, metrics=LoopMetrics(obs_tags)).start()

    def _scheduler_client(self):
        from dspark.scheduler.actor import RaySchedulerTransport, get_or_create_scheduler
        from dspark.verifier_service.scheduler_client import SchedulerClient, engine_probe, replica_info

        sps = getattr(self.engine, "sps_profile", None)
        if sps is None:
            return None
        try:
            # detached: the actor must outlive whichever replica created it (replicas come and go with
            # autoscaling and failures); every replica reuses it by name. Keep the handle as well.
            self._scheduler = get_or_create_scheduler(detached=True)
            info = replica_info(self.session, sps, max_batch_size=self.engine.max_batch_size, gamma=self.engine.gamma)
            client = SchedulerClient(info, RaySchedulerTransport(), probe=engine_probe(self.engine))
            self.engine.add_observer(client.observe_step)
            return client.start()
        except Exception:
            log.exception("scheduler unavailable at start-up; scheduling locally")
            return None

    def info(self) -> dict:
        e = self.engine
        return {"model_path": self.model_path, "max_model_len": e.max_model_len, "vocab_size": e.vocab_size,
                "gamma": e.gamma, "session": self.session, "topology": self.cfg.topology if e.drafter else "plain"}

    def stats(self) -> dict:
        """Counters for benchmarks and tests."""
        e, d = self.engine, self.engine.drafter
        out = {"steps": e.timings.steps, "draft_s": e.timings.draft_s, "verify_s": e.timings.verify_s,
               "prefill_s": e.timings.prefill_s, "tokens": e.timings.tokens,
               "topology": self.cfg.topology if d is not None else "plain",
               "fallback_steps": e.total_fallback_steps, "skipped_draft_steps": e.skipped_draft_steps,
               "draft_steps": e.draft_steps,
               "context_failures": e.context_failures, "running": e.num_running, "session": self.session}
        for k in ("calls", "failures", "sessions_lost", "sent_bytes", "received_bytes", "last_worker"):
            if hasattr(d, k):
                out[f"draft_{k}"] = getattr(d, k)
        if self.client is not None:  # the scheduler client: answered / failed heartbeats, budget source
            st = self.client.status()
            out.update(scheduler_exchanges=st.exchanges, scheduler_failures=st.failures,
                       budget_from_scheduler=st.budget_from_scheduler)
        return out

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        stream = self.loop.submit(request)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:  # the caller went away (client disconnect): free the slot
                stream.cancel()

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError("the step loop is not running")
        broken = getattr(self.engine, "broken", None)  # a tensor-parallel group that lost a rank
        if broken:
            raise RuntimeError(f"the tensor-parallel group is broken: {broken}")

    def __del__(self):
        try:
            self.loop.stop(2.0)
            if self.client is not None:
                self.client.stop()
            if hasattr(self.engine, "shutdown"):  # a tensor-parallel group: its rank actors
                self.engine.shutdown()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------- ingress
api = FastAPI(title="dspark", docs_url=None, redoc_url=None)


def _api_key(cfg: ServeConfig) -> str | None:
    ing = cfg.ingress
    # a blank key would let every request without a key in: refuse to start instead
    if ing.api_key_file:
        lines = Path(ing.api_key_file).expanduser().read_text().splitlines()
        if not lines or not lines[0].strip():
            raise RuntimeError(f"the API key file {ing.api_key_file} has no key on its first line")
        return lines[0].strip()
    if ing.api_key_env:
        key = os.environ.get(ing.api_key_env, "").strip()  # HTTP strips header values: so do we
        if not key:
            raise RuntimeError(f"the API key variable {ing.api_key_env} is not set (or blank)")
        return key
    return None


def chat_ids(tok: Any, messages: list[dict]) -> list[int]:
    """The prompt token ids of ``messages`` through the model's chat template."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def _error(exc: oai.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@serve.deployment(name=DEPLOYMENT_NAMES["ingress"])
@serve.ingress(api)
class Ingress:
    def __init__(self, args: dict, verifier: Any):
        self.cfg = ServeConfig.model_validate(args)
        self.verifier = verifier
        self.key = _api_key(self.cfg)
        self._info: dict | None = None
        self._tokenizer = None
        self.obs = IngressMetrics(serve_tags())

    async def _setup(self):
        if self._info is None:
            from transformers import AutoTokenizer

            self._info = await self.verifier.info.remote()
            self._tokenizer = AutoTokenizer.from_pretrained(self._info["model_path"])
        return self._info, self._tokenizer

    def _auth(self, request: Request) -> None:
        if self.key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.key.encode()):  # constant time
            raise oai.APIError(401, "invalid or missing API key", kind="authentication_error", code="invalid_api_key")

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._auth(request)
        except oai.APIError as exc:
            self.obs.error(exc)
            return _error(exc)
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "owned_by": "dspark"}]}

    @api.get("/dspark/stats")
    async def replica_stats(self, request: Request):
        """One verifier replica's step counters (``VerifierReplica.stats``), for ``dspark bench
        serve``: Serve routes the call to one replica, so with several the figures are per replica."""
        try:
            self._auth(request)
        except oai.APIError as exc:
            return _error(exc)
        return await self.verifier.stats.remote()

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, *, chat: bool) -> Response:
        timer = self.obs.request("chat" if chat else "completions")  # TTFT, ITL, latency, errors
        try:
            self._auth(request)
            body = oai.parse_body(await request.body(), oai.ChatBody if chat else oai.CompletionBody,
                                  max_bytes=self.cfg.ingress.max_body_bytes)
            if body.model != self.cfg.model_name:
                raise oai.APIError(404, f"model {body.model!r} does not exist (this server serves {self.cfg.model_name!r})",
                                   param="model", code="model_not_found")
            info, tok = await self._setup()
            ids = self._prompt_ids(body, tok, chat, info)
            params = oai.sampling_params(body, default_max_tokens=self.cfg.ingress.max_tokens_default)
            if len(ids) + params.max_tokens > info["max_model_len"]:
                raise oai.APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                        f"context length ({info['max_model_len']})", param="max_tokens",
                                   code="context_length_exceeded")
            rid = oai.new_id("chatcmpl" if chat else "cmpl")
            gen = self.verifier.options(stream=True).generate.remote(GenerationRequest(rid, tuple(ids), params))
            first = await self._first(gen)
            timer.output(len(first.new_token_ids))
        except oai.APIError as exc:
            timer.error(exc)
            return _error(exc)
        acceptance = bool(body.dspark and body.dspark.acceptance)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(gen, first, rid, tok, chat, len(ids), acceptance, include_usage, timer),
                                     media_type="text/event-stream")
        last = first
        try:
            async for out in gen:
                last = out
                timer.output(len(out.new_token_ids))
        except Exception:
            timer.error("server_error")
            raise
        timer.done()
        text = tok.decode(list(last.token_ids), skip_special_tokens=True)
        make = oai.chat_response if chat else oai.completion_response
        return JSONResponse(make(rid, self.cfg.model_name, text, last, len(ids), acceptance))

    def _prompt_ids(self, body, tok, chat: bool, info: dict) -> list[int]:
        if chat:
            msgs = [m.model_dump(exclude_none=True) for m in body.messages]
            try:
                return chat_ids(tok, msgs)
            except Exception as exc:  # a template that refuses an order of roles (raise_exception)
                raise oai.APIError(400, f"the model's chat template refused these messages: {exc}",
                                   param="messages") from None
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise oai.APIError(400, "prompt must not be empty", param="prompt")
            return list(tok(body.prompt, add_special_tokens=False)["input_ids"])
        if not body.prompt or any(not 0 <= t < info["vocab_size"] for t in body.prompt):
            raise oai.APIError(400, f"prompt token ids must be non-empty and in [0, {info['vocab_size']})", param="prompt")
        return list(body.prompt)

    async def _first(self, gen) -> RequestOutput:
        from dspark.verifier_service.engine import RequestRejected

        try:
            return await gen.__anext__()
        except RequestRejected as exc:
            raise oai.APIError(400, str(exc)) from None
        except StopAsyncIteration:
            raise oai.APIError(500, "the request ended without output", kind="server_error") from None
        except Exception as exc:  # replica failure: fail fast with the reason, never hang
            log.exception("verifier failed")
            raise oai.APIError(503, f"the verifier replica failed: {type(exc).__name__}", kind="server_error") from None

    async def _stream(self, gen, first: RequestOutput, rid: str, tok, chat: bool, prompt_tokens: int,
                      acceptance: bool, include_usage: bool, timer: Any = None):
        model, sent, last = self.cfg.model_name, "", first
        if chat:
            yield oai.sse(oai.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        try:
            out: RequestOutput | None = first
            while out is not None:
                last = out
                text = tok.decode(list(out.token_ids), skip_special_tokens=True)
                hold = text.endswith("\ufffd") and not out.finished  # an incomplete UTF-8 sequence: wait
                delta = "" if hold else text[len(sent):]
                if delta or out.finished:
                    sent = text if not hold else sent
                    yield oai.sse(oai.chat_chunk(rid, model, {"content": delta}, out) if chat
                                  else oai.completion_chunk(rid, model, delta, out))
                try:
                    out = await gen.__anext__()
                    if timer is not None:
                        timer.output(len(out.new_token_ids))
                except StopAsyncIteration:
                    out = None
        except Exception as exc:
            log.exception("stream %s failed", rid)
            if timer is not None:
                timer.error("server_error")
            yield oai.sse({"error": {"message": f"the verifier replica failed: {type(exc).__name__}", "type": "server_error"}})
        finally:
            gen.cancel()  # no-op when finished; a disconnected client aborts the request
        if include_usage or acceptance:
            u = oai.usage(prompt_tokens, last, acceptance)
            yield oai.sse(oai.chat_chunk(rid, model, {}, None, {"choices": [], "usage": u}) if chat
                          else oai.completion_chunk(rid, model, "", None, {"choices": [], "usage": u}))
        yield oai.sse("[DONE]")
        if timer is not None:
            timer.done()


# ----------------------------------------------------------------------------------------- app
def app_builder(args: dict) -> serve.Application:
    """The application for ``serve run``/``serve deploy`` (``args`` = a ServeConfig mapping)."""
    cfg = ServeConfig.model_validate(args or {})
    data = cfg.model_dump(mode="json")
    draft = None
    if cfg.drafter_path is not None and cfg.topology == "disaggregated":
        draft = DraftWorker.options(**cfg.draft_worker.to_serve()).bind(data)
    options = cfg.verifier.to_serve()
    if cfg.tensor_parallel_size > 1:  # the resources are the ranks'; the replica actor only coordinates
        options["ray_actor_options"] = {"num_cpus": 0.05, "num_gpus": 0}
    verifier = VerifierReplica.options(**options).bind(data, draft)
    return Ingress.options(**cfg.ingress_deployment.to_serve()).bind(data, verifier)
