"""The `quantization_config` of a pre-quantized checkpoint: which layouts load, and the one
`weights.quantize` writes.

Pre-quantized checkpoints (`parse_quantization_config`) store `{prefix}.weight` as float8_e4m3fn and
`{prefix}.weight_scale` (per tensor: shape [] or [1]; per channel: [out] or [out, 1]; any float dtype) with
w ~= weight * weight_scale. Accepted `config.json` `quantization_config` layouts:

1. vLLM / AutoFP8 / llm-compressor "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic",
   "ignored_layers": [...]} with `weight_block_size` absent or null. `activation_scheme: "static"` is
   rejected: those checkpoints carry `input_scale` tensors for static activation quantization, which this
   engine does not implement (it keeps activations in fp16/bf16).
2. compressed-tensors (llm-compressor), "format" "float-quantized" or "naive-quantized", status "compressed":
   every config group has weights {"type": "float", "num_bits": 8, "strategy": "channel" | "tensor",
   "symmetric": true, "dynamic": false, no group_size / block_structure} and input_activations either null
   (weight-only, "FP8" W8A16) or dynamic float8 with strategy "token" or "tensor" ("FP8_DYNAMIC"); the
   activations are then simply run in fp16/bf16, which is more accurate. Static input activations, output
   activations, a kv_cache_scheme and sparsity are rejected.

In both, only lm_head may be left unquantized (`ignored_layers` / `ignore` / `modules_to_not_convert`); a
compressed-tensors config must list lm_head there, as lm_head stays in the activation dtype here.
`quantize_checkpoint` writes layout 2 (weight-only, per channel, weight_scale [out, 1] float32): vLLM's "fp8"
method only loads per-tensor scales, while compressed-tensors per-channel FP8 loads in vLLM and HF too.
"""
from __future__ import annotations

import re


def _only_lm_head(entries, field: str) -> bool:
    """Checks an ignore list names nothing but lm_head; returns whether lm_head is in it."""
    has_lm_head = False
    for entry in entries or []:
        if not isinstance(entry, str):
            raise ValueError(f"'{field}' entries must be strings, got {entry!r}")
        if entry.startswith("re:"):
            pattern = entry[3:]
            matches_head = re.fullmatch(pattern, "lm_head") is not None
            probes = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")
            matches_decoder = any(re.fullmatch(pattern, p) for p in probes)
        else:
            matches_head = entry.split(".")[-1] == "lm_head"
            matches_decoder = False
        if not matches_head or matches_decoder:
            raise ValueError(f"'{field}' entry '{entry}' is not supported: only lm_head may stay unquantized "
                             f"(all decoder linears must be FP8)")
        has_lm_head = True
    return has_lm_head


def _ct_weights_ok(group: str, w: dict | None) -> None:
    if not isinstance(w, dict):
        raise ValueError(f"compressed-tensors group '{group}' has no 'weights' scheme")
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise ValueError(f"compressed-tensors group '{group}': weights type={w.get('type')!r} "
                         f"num_bits={w.get('num_bits')!r} are not supported (only float 8-bit, e4m3)")
    if w.get("strategy") not in ("channel", "tensor"):
        raise ValueError(f"compressed-tensors group '{group}': weight strategy {w.get('strategy')!r} is not "
                         f"supported (only 'channel' or 'tensor')")
    if w.get("symmetric", True) is not True or w.get("dynamic", False) not in (False, None):
        raise ValueError(f"compressed-tensors group '{group}': only symmetric, static weight scales are supported")
    if w.get("group_size") is not None or w.get("block_structure") is not None:
        raise ValueError(f"compressed-tensors group '{group}': group/block-wise weight scales are not supported")


def _ct_inputs_ok(group: str, a: dict | None) -> None:
    if a is None:
        return
    if (a.get("type") != "float" or a.get("num_bits") != 8 or a.get("dynamic") is not True
            or a.get("strategy") not in ("token", "tensor") or a.get("group_size") is not None):
        raise ValueError(f"compressed-tensors group '{group}': input_activations {a} are not supported (only none, "
                         f"or dynamic float8 per token / per tensor; static activation scales (input_scale) are "
                         f"not implemented)")


def parse_quantization_config(cfg: dict | None) -> str | None:
    """config.json's `quantization_config` -> "fp8" for the supported layouts (see the module docstring),
    None for no config; ValueError naming the unsupported quant_method / scheme otherwise."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(cfg).__name__}")
    method = cfg.get("quant_method")
    if method == "fp8":
        scheme = cfg.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(f"quant_method 'fp8' with activation_scheme '{scheme}' is not supported (static "
                             f"activation scales / input_scale are not implemented; only 'dynamic')")
        if cfg.get("weight_block_size") is not None:
            raise ValueError(f"quant_method 'fp8' with weight_block_size {cfg['weight_block_size']} (block-wise "
                             f"scales) is not supported; only per-tensor or per-channel weight_scale")
        if cfg.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"quant_method 'fp8' with fmt '{cfg['fmt']}' is not supported (only e4m3)")
        for key in ("ignored_layers", "modules_to_not_convert"):
            _only_lm_head(cfg.get(key), key)
        return "fp8"
    if method == "compressed-tensors":
        fmt = cfg.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ValueError(f"compressed-tensors format '{fmt}' is not supported (only 'float-quantized' or "
                             f"'naive-quantized' FP8)")
        status = cfg.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(f"compressed-tensors quantization_status '{status}' is not supported (only "
                             f"'compressed' checkpoints)")
        if cfg.get("kv_cache_scheme") is not None:
            raise ValueError("compressed-tensors kv_cache_scheme is not supported (FP8 KV cache scales)")
        if cfg.get("sparsity_config"):
            raise ValueError("compressed-tensors sparsity_config is not supported")
        groups = cfg.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ValueError("compressed-tensors config has no 'config_groups'")
        for gname, group in groups.items():
            if not isinstance(group, dict):
                raise ValueError(f"compressed-tensors group '{gname}' is not an object")
            gfmt = group.get("format")
            if gfmt is not None and gfmt not in ("float-quantized", "naive-quantized"):
                raise ValueError(f"compressed-tensors group '{gname}' format '{gfmt}' is not supported")
            if "Linear" not in (group.get("targets") or []):
                raise ValueError(f"compressed-tensors group '{gname}' targets {group.get('targets')} are not "
                                 f"supported: only ['Linear'] (every decoder linear FP8)")
            _ct_weights_ok(gname, group.get("weights"))
            _ct_inputs_ok(gname, group.get("input_activations"))
            if group.get("output_activations") is not None:
                raise ValueError(f"compressed-tensors group '{gname}': output_activations are not supported")
        if not _only_lm_head(cfg.get("ignore"), "ignore"):
            raise ValueError("compressed-tensors config quantizes lm_head ('ignore' lacks it); only an "
                             "unquantized lm_head is supported")
        return "fp8"
    raise ValueError(f"unsupported quantization_config quant_method '{method}' (supported: 'fp8' and "
                     f"'compressed-tensors' FP8)")


def fp8_quantization_config() -> dict:
    """The `quantization_config` that `quantize_checkpoint` writes: compressed-tensors, weight-only FP8 e4m3
    with one scale per output channel, lm_head unquantized."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                            "dynamic": False, "group_size": None, "block_structure": None, "actorder": None,
                            "observer": "minmax", "observer_kwargs": {}},
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }
