"""The default of every decoding option, in one table that the Python API (`SamplingParams`), the server's
request bodies and the command line (`selfrag-engine generate --help` prints each default, `serve --help` the
request defaults) all read. The values are vLLM's (and OpenAI's): 16 tokens, temperature 1, no truncation, no
penalty. Chat completions alone generate up to the rest of the context when no max_tokens is given, as vLLM's
chat endpoint does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Default:
    value: Any
    help: str


SAMPLING_DEFAULTS: dict[str, Default] = {
    "max_tokens": Default(16, "the most tokens to generate (chat completions: the rest of the context)"),
    "temperature": Default(1.0, "sampling temperature; 0 is greedy"),
    "top_p": Default(1.0, "nucleus sampling: keep the most likely tokens whose probabilities add up to top_p"),
    "top_k": Default(0, "keep the k most likely tokens; 0 keeps all (the server also takes vLLM's -1)"),
    "min_p": Default(0.0, "drop tokens less likely than min_p times the most likely one; 0 is off"),
    "presence_penalty": Default(0.0, "subtracted from the logit of every token already generated (-2 to 2)"),
    "frequency_penalty": Default(0.0, "subtracted from a token's logit once per time it was generated (-2 to 2)"),
    "repetition_penalty": Default(1.0, "divides the positive logits (multiplies the negative ones) of the tokens "
                                       "of the prompt and the output; 1 is off"),
    "seed": Default(None, "seed of the request's draws (none: the engine's generator)"),
    "n": Default(1, "choices per prompt"),
    "logprobs": Default(None, "top-n log-probabilities at every step (none: only the chosen token's)"),
    "skip_special_tokens": Default(True, "leave special tokens (the reflection tokens) out of the text"),
}


def default(name: str) -> Any:
    """The default of a decoding option."""
    return SAMPLING_DEFAULTS[name].value


def request_defaults_text() -> str:
    """The table as a command's help epilog: what a request that leaves a field out gets."""
    lines = ["defaults of a request's decoding fields (vLLM's; a field left out of the body):"]
    for name, d in SAMPLING_DEFAULTS.items():
        shown = "none" if d.value is None else d.value
        lines.append(f"  {name} = {shown}: {d.help}")
    return "\n".join(lines)


def help_text(name: str) -> str:
    """A command-line help string: what the option does and its default."""
    d = SAMPLING_DEFAULTS[name]
    shown = "none" if d.value is None else d.value
    return f"{d.help} (default: {shown})"
