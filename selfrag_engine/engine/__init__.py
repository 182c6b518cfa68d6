"""The serving core: requests, KV cache blocks, scheduling, model steps and sampling."""
