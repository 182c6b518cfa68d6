"""Errors raised for bad input. Each message names the problem (file, tensor, field, sizes)."""


class CheckpointError(ValueError):
    """A checkpoint directory, file, tensor or config field is missing or malformed."""


class RequestError(ValueError):
    """A generation request cannot be served as given (empty prompt, too long for the context, bad params)."""


class CacheCapacityError(RuntimeError):
    """A request can never fit in the KV cache pool, however many other sequences are preempted."""
