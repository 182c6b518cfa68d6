"""The server past one machine, on Ray Serve: engine replicas behind Ray's HTTP proxy, retrieval as its own
deployment, and a sharded index across retrieval replicas.

    selfrag-engine serve --model DIR --replicas N [--max-replicas M] [--ray-address ADDR] [--index DIR]

- **Engine replicas** (deployment `SelfragServer`, the ingress): each replica runs the whole single-process
  server, `build_app` over its own `EngineLoop`, so the HTTP surface (the OpenAI endpoints, `/v1/selfrag`,
  streaming, `/health`, `/metrics`) is the single-process server's by construction, and a Self-RAG query runs
  whole on one replica (its K branches share that replica's KV blocks). One GPU per replica
  (`ray_actor_options`), or `--replica-cpus` CPUs on a CPU-only cluster. Ray Serve's router sends each
  request to the less loaded of two replicas it samples (power of two choices on requests in flight). With
  `--max-replicas M` the deployment autoscales between `--replicas` and M on ongoing requests per replica
  (`--target-ongoing-requests`).
- **Retrieval** (deployments `IndexShard0`, `IndexShard1`, ...): each loads one shard of the index (a plain
  index is one shard) once, whatever the number of engine replicas, and serves searches of query embeddings
  batched across callers (`@serve.batch`). An engine replica's retriever is a `ShardedRetriever` whose shards
  are clients of those deployments: it encodes the queries (the encoder is small beside the index), fans out
  to every shard at once and merges the exact top-k (`retrieval/sharded_index.py`); a shard that fails or does
  not answer within `--shard-timeout` is an `IndexShardError` for the queries that needed it (HTTP 503).
- **Faults**: Ray restarts a replica that dies (its health check, `--health-check-period`). A request the dead
  replica held gets a 503 in OpenAI's error shape from the proxy layer below (`ReplicaFailure`), or, if it was
  not streamed (nothing can have reached the client yet), is sent again once to a live replica; a stream that
  breaks ends with an error event instead of hanging. Survivors hold only their own requests' KV blocks.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from selfrag_engine.engine.llm_engine import Engine
from selfrag_engine.engine.loop import EngineLoop
from selfrag_engine.entrypoints.access import Access
from selfrag_engine.entrypoints.replica_failure import CALLBACK, CALLBACK_ENV
from selfrag_engine.entrypoints.replica_options import check_replica_bounds
from selfrag_engine.entrypoints.server import build_app
from selfrag_engine.entrypoints.server_limits import ServerLimits
from selfrag_engine.errors import IndexShardError, RequestError
from selfrag_engine.retrieval.encoders import get_encoder
from selfrag_engine.retrieval.retriever import Hit, Retriever
from selfrag_engine.retrieval.sharded_index import ShardedRetriever, is_sharded, read_index_meta, shard_dir_name

APP_NAME = "selfrag"
ENGINE_DEPLOYMENT = "SelfragServer"
REPLICA_HEADER = "x-selfrag-replica"
DEFAULT_SHARD_TIMEOUT_S = 30.0


@dataclass
class ReplicaConfig:
    """What every engine replica builds its engine and app from (sent to the replicas by Ray)."""
    model: str
    served_model_name: str
    device: str | None = None
    dtype: Any = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    num_blocks: int | None = None
    max_pending: int = 256
    limits: ServerLimits = field(default_factory=ServerLimits)
    access: Access = field(default_factory=Access)
    index: str | None = None
    shard_timeout_s: float = DEFAULT_SHARD_TIMEOUT_S
    # Cores each replica is pinned to, by replica rank (bench/scale.py); None: Ray's scheduling alone.
    cpu_affinity: list[list[int]] | None = None


@dataclass
class DeploymentOptions:
    """How many replicas of what size: the operator's knobs, documented in docs/DEPLOY.md."""
    replicas: int = 1
    max_replicas: int | None = None            # > replicas: autoscale between them
    target_ongoing_requests: float = 16.0      # autoscaling's target per replica
    upscale_delay_s: float = 30.0              # how long above the target before a replica is added (Ray's default)
    downscale_delay_s: float = 600.0           # how long below it before one is removed (Ray's default)
    max_ongoing_requests: int = 256            # a replica's bound before the router queues (its loop batches)
    replica_gpus: float | None = None          # default: 1 on a cluster with GPUs, else 0
    replica_cpus: float = 1.0
    shard_replicas: int = 1                    # replicas of each index shard
    shard_cpus: float = 1.0
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0


# ---- retrieval --------------------------------------------------------------------------------------------


def index_shard_count(index: str | Path) -> int:
    """How many shard deployments an index directory needs (a plain index is one)."""
    meta = read_index_meta(index)
    return meta["shards"] if is_sharded(index) else 1


def _load_shard(index: str, i: int) -> Retriever:
    if is_sharded(index):
        return ShardedRetriever.load_shard(index, i, gpu=None)
    return Retriever.load(index)


@serve.deployment(max_ongoing_requests=1024)
class IndexShard:
    """One shard of the index (loaded once per replica), searched by query embeddings; the calls that
    arrive together go to faiss as one batch."""

    def __init__(self, index: str, i: int):
        self.shard = _load_shard(index, i)
        self.searches = 0

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def search(self, calls: list[tuple[np.ndarray, int]]) -> list[list[list[Hit]]]:
        # One faiss search per distinct k; each call's rows come back as its own answer.
        by_k: dict[int, list[int]] = defaultdict(list)
        for j, (_, k) in enumerate(calls):
            by_k[k].append(j)
        answers: list[list[list[Hit]]] = [[] for _ in calls]
        for k, js in by_k.items():
            q = np.concatenate([calls[j][0] for j in js])
            hits = await asyncio.to_thread(self.shard.search_embeddings, q, k)
            start = 0
            for j in js:
                n = len(calls[j][0])
                answers[j] = hits[start:start + n]
                start += n
        self.searches += sum(len(q) for q, _ in calls)
        return answers

    def count(self) -> int:
        return len(self.shard)


class RemoteShard:
    """A `ShardedRetriever` shard served by an `IndexShard` deployment (blocking: called from the search
    batcher's thread, never the event loop)."""

    def __init__(self, handle: DeploymentHandle, i: int, n: int, timeout_s: float):
        self.handle, self.i, self.n, self.timeout_s = handle, i, n, timeout_s

    def search_embeddings(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        try:
            return self.handle.search.remote((queries, k)).result(timeout_s=self.timeout_s)
        except TimeoutError:
            raise IndexShardError(f"index shard {self.i} of {self.n} did not answer within {self.timeout_s:g} s") \
                from None
        except Exception as e:  # noqa: BLE001 - a dead or failing replica: the shard's named error
            raise IndexShardError(f"index shard {self.i} of {self.n} failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from None


def remote_retriever(index: str, handles: list[DeploymentHandle], timeout_s: float) -> ShardedRetriever:
    """The engine replica's retriever: the index's query encoder here, the vectors in the shard deployments."""
    if is_sharded(index):
        meta = ShardedRetriever.read_manifest(index)
        encoder = ShardedRetriever.encoder_for(index)
    else:
        meta = Retriever.read_meta(index)
        encoder = get_encoder(meta["encoder"]) if meta.get("encoder") else None
    if encoder is None:
        raise RequestError(f"the index in {index} has no query encoder to serve it with")
    n = len(handles)
    names = [shard_dir_name(i, n) if n > 1 else Path(index).name for i in range(n)]
    return ShardedRetriever([RemoteShard(h, i, n, timeout_s) for i, h in enumerate(handles)], encoder,
                            meta["dim"], meta["count"], names)


# ---- engine replicas --------------------------------------------------------------------------------------


class ReplicaHeader:
    """ASGI middleware: every response names the replica that served it (`x-selfrag-replica`, Ray Serve's
    replica id), so an operator can tell which replica answered, and which one a broken stream was on."""

    def __init__(self, app: Any, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


@serve.deployment(name=ENGINE_DEPLOYMENT)
@serve.ingress()
class SelfragServer:
    """One engine replica: the single-process server (`build_app`) over this replica's engine loop."""

    def __init__(self, config: ReplicaConfig, shards: list[DeploymentHandle] | None = None):
        if config.cpu_affinity:
            rank = serve.get_replica_context().rank
            rank = getattr(rank, "rank", rank)
            cores = config.cpu_affinity[int(rank) % len(config.cpu_affinity)]
            os.sched_setaffinity(0, cores)
            import torch

            torch.set_num_threads(len(cores))
        device = config.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        given = {"dtype": config.dtype, "quantization": config.quantization,
                 "kv_cache_dtype": config.kv_cache_dtype, "num_blocks": config.num_blocks}
        # Built on the loop's thread, so its OpenMP team is the replica's only one (see engine/loop.py).
        self.loop = EngineLoop(lambda: Engine.from_pretrained(config.model, device=device, progress=False,
                                                              **{k: v for k, v in given.items() if v is not None}),
                               max_pending=config.max_pending)
        retriever = None
        if shards:
            assert config.index is not None
            retriever = remote_retriever(config.index, shards, config.shard_timeout_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.asgi_app = build_app(self.loop, config.served_model_name, retriever, config.limits, config.access)
        self.asgi_app.add_middleware(ReplicaHeader, replica=self.replica)

    def __serve_build_asgi_app__(self):
        return self.asgi_app

    async def check_health(self) -> None:
        """Ray's health check: an engine loop that no longer answers (its thread died, or it failed) is an
        unhealthy replica, which Ray replaces."""
        await asyncio.wrap_future(self.loop.call(lambda: None))

    async def kv_blocks(self) -> dict[str, Any]:
        """This replica's KV blocks in use and free and its requests in flight, with its replica id (the
        `x-selfrag-replica` header) and process id (for tests and operators)."""
        stats = await asyncio.wrap_future(self.loop.call(self.loop.engine.cache_stats))
        return {"used": stats["used"], "free": stats["free"], "pending": self.loop.pending, "pid": os.getpid(),
                "replica": self.replica}

    def __del__(self):
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.close()


def build_application(config: ReplicaConfig, options: DeploymentOptions) -> Any:
    """The bound Ray Serve application: the engine deployment, and one deployment per index shard."""
    check_replica_bounds(options.replicas, options.max_replicas)
    shards = []
    if config.index is not None:
        n = index_shard_count(config.index)
        for i in range(n):
            shards.append(IndexShard.options(name=f"IndexShard{i}", num_replicas=options.shard_replicas,
                                             ray_actor_options={"num_cpus": options.shard_cpus},
                                             health_check_period_s=options.health_check_period_s,
                                             health_check_timeout_s=options.health_check_timeout_s,
                                             ).bind(config.index, i))
    gpus = options.replica_gpus
    if gpus is None:
        gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    scaling: dict[str, Any]
    if options.max_replicas is not None and options.max_replicas > options.replicas:
        scaling = {"autoscaling_config": {"min_replicas": options.replicas, "max_replicas": options.max_replicas,
                                          "target_ongoing_requests": options.target_ongoing_requests,
                                          "upscale_delay_s": options.upscale_delay_s,
                                          "downscale_delay_s": options.downscale_delay_s}}
    else:
        scaling = {"num_replicas": options.replicas}
    return SelfragServer.options(
        ray_actor_options={"num_gpus": gpus, "num_cpus": options.replica_cpus},
        max_ongoing_requests=options.max_ongoing_requests,
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=options.health_check_timeout_s,
        **scaling).bind(config, shards or None)


# ---- the command ------------------------------------------------------------------------------------------


def replica_config(args: Any) -> ReplicaConfig:
    return ReplicaConfig(model=args.model, served_model_name=args.served_model_name, device=args.device,
                         dtype=args.dtype, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                         num_blocks=args.num_blocks, max_pending=args.max_pending,
                         limits=ServerLimits.from_args(args), access=Access.from_args(args),
                         index=None if args.index is None else str(Path(args.index).resolve()),
                         shard_timeout_s=args.shard_timeout)


def deployment_options(args: Any) -> DeploymentOptions:
    return DeploymentOptions(replicas=args.replicas, max_replicas=args.max_replicas,
                             target_ongoing_requests=args.target_ongoing_requests,
                             replica_gpus=args.replica_gpus, replica_cpus=args.replica_cpus,
                             shard_replicas=args.shard_replicas)


def start(args: Any) -> None:
    """Connects to the Ray cluster at --ray-address (or starts a local one), starts Serve's HTTP proxy on
    --host/--port and deploys the application."""
    if not args.ray_address:
        # The local cluster's proxy answers for a dead replica (`replica_failure`); a cluster started by
        # `ray start` gets the same from this variable in its nodes' environment (docs/DEPLOY.md).
        os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    options = deployment_options(args)
    local: dict[str, Any] = {}
    if not args.ray_address:
        # A local cluster counts at least the CPUs the deployments ask for, so a small machine still places
        # them all (they then share its cores), rather than leaving replicas pending forever.
        shards = index_shard_count(args.index) if args.index is not None else 0
        asked = options.replicas * options.replica_cpus + shards * options.shard_replicas * options.shard_cpus
        local["num_cpus"] = max(os.cpu_count() or 1, int(asked + 0.999))
    ray.init(address=args.ray_address, ignore_reinit_error=True, log_to_driver=not args.quiet, **local)
    http = {"host": args.host, "port": args.port}
    if args.ssl_keyfile or args.ssl_certfile:
        http.update(ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    serve.start(http_options=http)
    serve.run(build_application(replica_config(args), options), name=APP_NAME, route_prefix="/")


def serve_command(args: Any) -> int:
    """`selfrag-engine serve --replicas N`: runs until interrupted (SIGINT, SIGTERM), then removes the
    application, and stops the local cluster if this command started it."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        start(args)
        where = f"cluster {args.ray_address}" if args.ray_address else "a local cluster"
        print(f"serving {args.served_model_name} on http://{args.host}:{args.port} with {args.replicas} "
              f"replica(s) on Ray ({where})", flush=True)
        stop.wait()
    finally:
        if ray.is_initialized():
            try:
                if args.ray_address:
                    serve.delete(APP_NAME)
                else:
                    serve.shutdown()
            finally:
                ray.shutdown()
    return 0
