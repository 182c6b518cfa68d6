"""The options of `selfrag-engine serve` that deploy it on Ray Serve (`--replicas` and beside it), registered
and checked without importing Ray, which only a replicated `serve` needs (the `ray` extra)."""
from __future__ import annotations

import argparse

from selfrag_engine.errors import RequestError

RAY_EXTRA = "ray"


def add_replica_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("replicas (Ray Serve; docs/DEPLOY.md)")
    g.add_argument("--replicas", type=int, default=None,
                   help="serve on Ray Serve with N engine replicas (one GPU each; CPUs on a CPU-only cluster)")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale between --replicas and this many on ongoing requests per replica")
    g.add_argument("--target-ongoing-requests", type=float, default=16.0,
                   help="autoscaling's target of requests in flight per replica")
    g.add_argument("--ray-address", default=None,
                   help="the Ray cluster to deploy on ('auto', or ray://HOST:10001); default: start a local one")
    g.add_argument("--replica-gpus", type=float, default=None,
                   help="GPUs per engine replica (default: 1 on a cluster with GPUs, else 0)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per engine replica")
    g.add_argument("--shard-replicas", type=int, default=1, help="replicas of each index shard's deployment")
    g.add_argument("--shard-timeout", type=float, default=30.0,
                   help="seconds an index shard may take to answer before the query fails (503)")


def check_replica_bounds(replicas: int, max_replicas: int | None) -> None:
    """The engine deployment's replica counts (the command's, and `build_application`'s from Python)."""
    if replicas < 1:
        raise RequestError(f"--replicas must be at least 1, got {replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise RequestError(f"--max-replicas {max_replicas} is below --replicas {replicas}")


def check_replica_options(args: argparse.Namespace) -> bool:
    """Whether `serve` runs on Ray; the Ray options without --replicas, or Ray missing, are named errors."""
    ray_only = [name for name in ("max_replicas", "ray_address", "replica_gpus") if getattr(args, name) is not None]
    if args.replicas is None:
        if ray_only:
            raise RequestError(f"--{ray_only[0].replace('_', '-')} needs --replicas N (serving on Ray Serve)")
        return False
    check_replica_bounds(args.replicas, args.max_replicas)
    if args.shard_replicas < 1:
        raise RequestError(f"--shard-replicas must be at least 1, got {args.shard_replicas}")
    if not args.shard_timeout > 0:
        raise RequestError(f"--shard-timeout must be positive, got {args.shard_timeout}")
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise RequestError(f"`selfrag-engine serve --replicas` needs Ray Serve, which is not installed: "
                           f"pip install 'selfrag-engine[{RAY_EXTRA}]'") from None
    return True
