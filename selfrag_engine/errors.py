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


class ContextLengthError(RequestError):
    """A prompt, with room to generate, does not fit the model's context (vLLM's context_length_exceeded)."""


class CacheCapacityError(SelfragEngineError, RuntimeError):
    """A request can never fit in the KV cache pool, however many other sequences are preempted."""


class EngineConfigError(SelfragEngineError, ValueError):
    """An engine option is out of its range (a batch limit of zero, a block size below one)."""


class SchedulingError(SelfragEngineError, RuntimeError):
    """Requests that cannot make progress: nothing the engine can schedule would ever finish them."""


class DeviceError(SelfragEngineError, RuntimeError):
    """The device asked for is not available on this machine."""


class QueueFullError(SelfragEngineError, RuntimeError):
    """The engine loop admits no more requests now (its bound on requests in flight is reached); retry later."""


class DeadlineExceeded(SelfragEngineError, RuntimeError):
    """A request or query did not finish before its deadline; it was aborted and its cache freed."""


class Cancelled(SelfragEngineError, RuntimeError):
    """A request or query was cancelled (by its caller, a disconnected client, or the loop closing)."""


class Unavailable(SelfragEngineError, RuntimeError):
    """A part of a deployment the request needs (an engine replica, an index shard) is down or did not answer
    in time; the request failed whole (HTTP 503) and may be retried."""


class IndexShardError(Unavailable):
    """A piece of a sharded index is missing or did not answer: the queries that needed it fail, never with a
    partial top-k."""
