"""Command line: `selfrag-engine generate | convert | quantize | eval | index | ask | serve`."""
from __future__ import annotations

import argparse
import errno
import json
import socket
import sys

from selfrag_engine.engine.sampling_defaults import default, help_text, request_defaults_text
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.entrypoints.ask import register as register_ask
from selfrag_engine.entrypoints.eval import register as register_eval
from selfrag_engine.entrypoints.index import register as register_index
from selfrag_engine.entrypoints.model_args import (
    add_hub_arguments,
    add_model_arguments,
    engine_options,
    load_engine,
    model_name,
    resolve_model_arg,
)
from selfrag_engine.entrypoints.serve_options import add_serve_options
from selfrag_engine.entrypoints.replica_options import add_replica_options, check_replica_options
from selfrag_engine.errors import RequestError, SelfragEngineError
from selfrag_engine.hub import resolve_model
from selfrag_engine.weights.convert import convert_bin_to_safetensors
from selfrag_engine.weights.quantize import quantize_checkpoint


def _generate(args: argparse.Namespace) -> int:
    resolve_model_arg(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, stop=args.stop or [], logprobs=args.logprobs,
                            skip_special_tokens=not args.keep_special_tokens)
    outputs = load_engine(args).generate(args.prompts, params)
    for prompt, out in zip(args.prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason,
                              "cumulative_logprob": out.cumulative_logprob, "logprobs": out.logprobs}))
        else:
            print(out.text)
    return 0


def _convert(args: argparse.Namespace) -> int:
    src = resolve_model(args.src, args.revision, download=args.download)
    convert_bin_to_safetensors(src, args.dst, progress=not args.quiet)
    print(f"wrote safetensors checkpoint to {args.dst}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    src = resolve_model(args.src, args.revision, download=args.download)
    quantize_checkpoint(src, args.dst, progress=not args.quiet)
    print(f"wrote FP8 checkpoint to {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfrag-engine", description="A decoding engine for Self-RAG models.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompts", nargs="+", help="prompt text (each one becomes a request)")
    add_model_arguments(g)
    for name, kind in (("max_tokens", int), ("temperature", float), ("top_p", float), ("top_k", int),
                       ("min_p", float), ("presence_penalty", float), ("frequency_penalty", float),
                       ("repetition_penalty", float), ("seed", int)):
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default(name), help=help_text(name))
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=default("logprobs"), help=help_text("logprobs"))
    g.add_argument("--keep-special-tokens", action="store_true", help="keep reflection tokens in the text")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=_generate)

    c = sub.add_parser("convert", help="convert pytorch_model*.bin weights to safetensors")
    c.add_argument("src", help="checkpoint directory or Hugging Face model id with pytorch_model*.bin")
    c.add_argument("dst")
    add_hub_arguments(c)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_convert)

    q = sub.add_parser("quantize", help="write an FP8 (e4m3, per-channel) copy of a checkpoint")
    q.add_argument("src", help="checkpoint directory or Hugging Face model id")
    q.add_argument("dst")
    add_hub_arguments(q)
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=_quantize)

    register_eval(sub)
    register_index(sub)
    register_ask(sub)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API and /v1/selfrag over HTTP",
                       epilog=request_defaults_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(s)
    s.add_argument("--index", default=None, help="retrieval index directory (`selfrag-engine index build`)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="TCP port, 1-65535 (checked free before the model loads)")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients name (default: the Hugging Face id, or the directory's name)")
    s.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: from the memory budget)")
    s.add_argument("--max-pending", type=int, default=256,
                   help="rows (sequences) of requests and queries in flight before 429")
    s.add_argument("--quiet", action="store_true")
    add_serve_options(s)
    add_replica_options(s)
    s.set_defaults(func=_serve)
    return parser


SERVE_EXTRA = "serve"


def check_serve_dependencies() -> None:
    """FastAPI and uvicorn are the `serve` extra: a missing one is named with the extra that brings it."""
    for module in ("fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            raise RequestError(f"`selfrag-engine serve` needs {module}, which is not installed: "
                               f"pip install 'selfrag-engine[{SERVE_EXTRA}]'") from None


def check_port(host: str, port: int) -> None:
    """A port out of range or already taken on `host` is refused before the model loads (binding as uvicorn
    will, with SO_REUSEADDR, so a port left in TIME_WAIT by a previous server still counts as free)."""
    if not 1 <= port <= 65535:
        raise RequestError(f"--port {port} is out of range (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise RequestError(f"--host {host!r} cannot be resolved: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RequestError(f"port {port} on {host} is already in use: stop what listens there or choose "
                                   "another --port") from None
            raise RequestError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _serve(args: argparse.Namespace) -> int:
    check_serve_dependencies()
    on_ray = check_replica_options(args)  # `--replicas`: on Ray Serve (the `ray` extra)
    check_port(args.host, args.port)
    path = resolve_model_arg(args)
    if args.index is not None:
        from selfrag_engine.retrieval.sharded_index import read_index_meta

        read_index_meta(args.index)
    args.served_model_name = args.served_model_name or model_name(args.model, path)
    args.model = str(path)
    options = engine_options(args)
    args.device, args.dtype, args.quantization = options["device"], options["dtype"], options["quantization"]
    if on_ray:
        from selfrag_engine.entrypoints.ray_serve import serve_command

        return serve_command(args)
    # FastAPI and uvicorn are the `serve` extra: only this command imports them.
    from selfrag_engine.entrypoints.server import serve

    return serve(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SelfragEngineError as e:
        # The user's input is at fault and the message says how: one line, exit 2 as argparse does for a
        # bad argument; anything else is a bug and keeps its traceback.
        print(f"selfrag-engine: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
