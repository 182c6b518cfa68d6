"""Linears fused along their output rows (q|k|v, gate|up) that keep the checkpoint's per-projection names.

A decode step is bound by launches and weight reads, so a layer holds one [q + k + v, hidden] weight instead of
three and runs one GEMV for them. Checkpoints, `state_dict()` and `load_state_dict()` keep Hugging Face's names
(`self_attn.q_proj.weight`, ...): a `ShardedLinears` module maps each of them to its rows of a fused child, for
plain `nn.Linear` weights and for `Fp8Linear` weights and scales alike (per-channel scales concatenate; a
per-tensor scale is expanded over its shard's rows).

The module loading protocol of `selfrag_engine.weights.checkpoint.load_weights`: a module with
`expected_checkpoint_attrs(prequantized)` and `load_checkpoint_tensor(attr, tensor)` loads the tensors of its
whole subtree; the attrs are checkpoint names relative to the module.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from selfrag_engine.errors import CheckpointError
from selfrag_engine.layers.fp8_linear import Fp8Linear

# Checkpoint dtypes a high-precision linear takes (copied into the model's dtype).
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Shard:
    """Checkpoint projection held by rows [start, stop) of the child linear named `linear`."""
    linear: str
    start: int
    stop: int


class ShardedLinears(nn.Module):
    """A module whose linear children each hold one or more checkpoint projections along their output rows.

    Subclasses call `set_shards({"q_proj": Shard("qkv_proj", 0, q), ...})` after creating their linears;
    every linear child must be covered. `name` is the module's qualified name, for error messages (the
    model sets it)."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self.shards: dict[str, Shard] = {}
        self.register_state_dict_post_hook(_split_state_dict)
        self.register_load_state_dict_pre_hook(_join_state_dict)

    def set_shards(self, shards: dict[str, Shard]) -> None:
        self.shards = dict(shards)

    def _leaves(self, linear: nn.Module, prequantized: bool) -> set[str]:
        if isinstance(linear, Fp8Linear):
            return linear.expected_checkpoint_attrs(prequantized)
        return {"weight"}

    def _label(self, attr: str) -> str:
        return f"'{self.name}.{attr}'" if self.name else f"'{attr}'"

    # -- checkpoint loading protocol ------------------------------------------------------------------------

    def expected_checkpoint_attrs(self, prequantized: bool) -> set[str]:
        return {f"{shard_name}.{leaf}" for shard_name, shard in self.shards.items()
                for leaf in self._leaves(getattr(self, shard.linear), prequantized)}

    def load_checkpoint_tensor(self, attr: str, tensor: torch.Tensor) -> None:
        """Copies (or, for an FP8 linear, quantizes) checkpoint tensor `attr` ("q_proj.weight") into its rows."""
        shard_name, _, leaf = attr.rpartition(".")
        shard = self.shards.get(shard_name)
        label = self._label(attr)
        if shard is None:
            raise CheckpointError(f"unexpected tensor {label} (not part of the model)")
        linear = getattr(self, shard.linear)
        if isinstance(linear, Fp8Linear):
            linear.load_checkpoint_rows(leaf, tensor, shard.start, shard.stop, label)
            return
        if leaf != "weight":
            raise CheckpointError(f"unexpected tensor {label} (not part of the model)")
        target = linear.weight[shard.start:shard.stop]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"tensor {label} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(target.shape)}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"tensor {label} has dtype {tensor.dtype}, expected a floating "
                                  f"point dtype (float32, float16 or bfloat16)")
        with torch.no_grad():
            target.copy_(tensor.to(target.device))


def _split_state_dict(module: ShardedLinears, state: OrderedDict, prefix: str, local_metadata: dict) -> None:
    """state_dict() under checkpoint names: each fused tensor becomes its shards' row slices (views)."""
    by_key: dict[str, list[tuple[str, Shard]]] = {}
    for shard_name, shard in module.shards.items():
        by_key.setdefault(f"{prefix}{shard.linear}.", []).append((shard_name, shard))
    # This module's and its children's entries were the last ones added: re-adding them keeps the order.
    own = [k for k in state if k.startswith(prefix)]
    entries = [(k, state.pop(k)) for k in own]
    for key, value in entries:
        linear_prefix, _, leaf = key.rpartition(".")
        shards = by_key.get(linear_prefix + ".")
        if shards is None or leaf not in ("weight", "weight_scale"):
            state[key] = value
            continue
        for shard_name, shard in shards:
            state[f"{prefix}{shard_name}.{leaf}"] = value[shard.start:shard.stop]


def _join_state_dict(module: ShardedLinears, state: dict, prefix: str, local_metadata: dict, strict: bool,
                     missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict() of checkpoint names: the shards are concatenated into the fused tensors."""
    fused: dict[str, list[str]] = {}
    for shard_name, shard in module.shards.items():
        fused.setdefault(shard.linear, []).append(shard_name)
    for linear, names in fused.items():
        for leaf in ("weight", "weight_scale"):
            keys = [f"{prefix}{n}.{leaf}" for n in names]
            if not all(k in state for k in keys):
                continue  # left for load_state_dict to report as missing
            parts = [state.pop(k) for k in keys]
            state[f"{prefix}{linear}.{leaf}"] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
