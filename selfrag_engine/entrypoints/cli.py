"""Command line: `selfrag-engine generate | convert | quantize | eval | index | ask`."""
from __future__ import annotations

import argparse
import json
import sys

from selfrag_engine.engine.llm_engine import KV_CACHE_DTYPES, Engine
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.entrypoints.ask import register as register_ask
from selfrag_engine.entrypoints.eval import register as register_eval
from selfrag_engine.entrypoints.index import register as register_index
from selfrag_engine.errors import SelfragEngineError
from selfrag_engine.weights.convert import convert_bin_to_safetensors
from selfrag_engine.weights.quantize import quantize_checkpoint


def _generate(args: argparse.Namespace) -> int:
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                    quantization=args.quantization, progress=not args.quiet,
                                    kv_cache_dtype=args.kv_cache_dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [], logprobs=args.logprobs,
                            skip_special_tokens=not args.keep_special_tokens)
    outputs = engine.generate(args.prompts, params)
    for prompt, out in zip(args.prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason,
                              "cumulative_logprob": out.cumulative_logprob, "logprobs": out.logprobs}))
        else:
            print(out.text)
    return 0


def _convert(args: argparse.Namespace) -> int:
    convert_bin_to_safetensors(args.src, args.dst, progress=not args.quiet)
    print(f"wrote safetensors checkpoint to {args.dst}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    quantize_checkpoint(args.src, args.dst, progress=not args.quiet)
    print(f"wrote FP8 checkpoint to {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfrag-engine", description="A decoding engine for Self-RAG models.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("prompts", nargs="+", help="prompt text (each one becomes a request)")
    g.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: checkpoint's on "
                                                 "CUDA, float32 on CPU)")
    g.add_argument("--quantization", default=None, choices=[None, "fp8"])
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=None, help="top-n log-probabilities per step")
    g.add_argument("--keep-special-tokens", action="store_true", help="keep reflection tokens in the text")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="auto: the model's dtype; fp8: e4m3 keys and values, twice the tokens per byte")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=_generate)

    c = sub.add_parser("convert", help="convert pytorch_model*.bin weights to safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_convert)

    q = sub.add_parser("quantize", help="write an FP8 (e4m3, per-channel) copy of a checkpoint")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=_quantize)

    register_eval(sub)
    register_index(sub)
    register_ask(sub)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API and /v1/selfrag over HTTP")
    s.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    s.add_argument("--index", default=None, help="retrieval index directory (`selfrag-engine index build`)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, help="the model id clients name (default: the directory)")
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    s.add_argument("--dtype", default=None)
    s.add_argument("--quantization", default=None, choices=["fp8"])
    s.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: from the memory budget)")
    s.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help="auto: the model's dtype; fp8: e4m3 keys and values, twice the tokens per byte")
    s.add_argument("--max-pending", type=int, default=256, help="requests and queries in flight before 429")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    # FastAPI and uvicorn are the `serve` extra: only this command needs them.
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
