"""`make demo`: an end-to-end run on the embedded default checkpoint.

Until the project ships a trained tiny Self-RAG model, the default is a tiny randomly initialised
Llama-2-shaped checkpoint with the Self-RAG tokenizer, written on first use; its text is noise, but every
layer of the engine (loading, tokenizer, paged cache, forked branches, sampler) runs.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from selfrag_engine import Engine, SamplingParams
from selfrag_engine.testing import write_tiny_checkpoint

PROMPT = "### Instruction:\n{question}\n\n### Response:\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    path = Path(args.model) if args.model else Path(tempfile.gettempdir()) / "selfrag-engine-demo-tiny"
    if args.model is None and not (path / "config.json").is_file():
        write_tiny_checkpoint(path, seed=0)
    engine = Engine.from_pretrained(path, device=args.device, progress=False)
    questions = ["Where was Ada Lovelace born?", "Write a greeting."]
    params = SamplingParams(max_tokens=24, temperature=0.0, reflection=True)
    for q, out in zip(questions, engine.generate([PROMPT.format(question=q) for q in questions], params)):
        print(f"Q: {q}")
        print(f"A: {out.text!r}  ({len(out.token_ids)} tokens, finish: {out.finish_reason})")
        if out.reflection_probs is not None:
            groups = out.reflection_groups
            first = out.reflection_probs[0]
            shown = ", ".join(f"{name}={[round(x, 3) for x in first[groups.span(name)].tolist()]}" for name in groups.names)
            print(f"   reflection groups at the first position: {shown}")


if __name__ == "__main__":
    main()
