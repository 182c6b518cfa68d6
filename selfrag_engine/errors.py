"""Errors raised for bad input. Each message names the problem (file, tensor, field, sizes).

Every one derives from `SelfragEngineError`, so a caller (the command line) can tell the errors that describe
a user's mistake from bugs; each also keeps the builtin base it has always had (ValueError, RuntimeError).
"""


class SelfragEngineError(Exception):
    """Base of the named errors: the input, not the engine, is at fault, and the message says how."""


class CheckpointError(SelfragEngineError, ValueError):
    """A checkpoint directory, file, tensor or config field is missing or malformed."""


class TokenizerError(CheckpointError):
    """A tokenizer file is missing or malformed, or the files contradict each other."""


class RequestError(SelfragEngineError, ValueError):
    """A generation request cannot be served as given (empty prompt, too long for the context, bad params)."""


class CacheCapacityError(SelfragEngineError, RuntimeError):
    """A request can never fit in the KV cache pool, however many other sequences are preempted."""

