"""A training run stopped at a snapshot and resumed with `--resume` ends with the weights of one that never
stopped: the snapshot carries the optimizer state and the step, and the example stream is replayed to it."""
from __future__ import annotations

import pytest
import torch

from selfrag_engine.config import LlamaConfig
from selfrag_engine.tiny.assets import default_model_dir
from selfrag_engine.tiny.evaluate import world_and_split
from selfrag_engine.tiny.train import (
    ModelShape,
    TrainConfig,
    hf_config,
    load_tokenizer,
    new_model,
    new_stream,
    read_snapshot,
    train,
    write_snapshot,
)

MODEL = default_model_dir()
pytestmark = pytest.mark.skipif(not (MODEL / "tokenizer.model").is_file(), reason="tiny_selfrag not present")


def _run(tmp_path, steps: int, seed: int, resume_from=None, fresh_optimizer: bool = False):
    world, split = world_and_split()
    tokenizer = load_tokenizer(MODEL)
    cfg = TrainConfig(steps=steps, batch_size=2, bucket_batches=2, snapshot_every=3, bf16=False)
    config = hf_config(ModelShape(64, 96, 1, 1, max_position_embeddings=512), len(tokenizer))
    model = new_model(LlamaConfig.from_dict(config), seed)
    resume = None
    if resume_from is not None:
        resume = read_snapshot(model, resume_from)
        if fresh_optimizer:
            resume = {**resume, "optimizer": {"state": {}, "param_groups": resume["optimizer"]["param_groups"]}}
    snaps = []
    train(model, tokenizer, new_stream(world, split, cfg, 0), cfg,
          snapshot=lambda state: snaps.append(write_snapshot(model, tmp_path, config, state)), resume=resume)
    return model, snaps


def test_a_resumed_run_ends_with_the_weights_of_an_unbroken_one(tmp_path):
    whole, snaps = _run(tmp_path / "whole", 7, seed=0)
    assert [s.name for s in snaps] == ["step-3", "step-6"]
    # Another initial seed: every weight of the resumed model must come from the snapshot.
    resumed, later = _run(tmp_path / "resumed", 7, seed=1, resume_from=snaps[0])
    assert [s.name for s in later] == ["step-6"]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    # The optimizer's moments matter: resumed without them, the run ends elsewhere.
    restarted, _ = _run(tmp_path / "restarted", 7, seed=1, resume_from=snaps[0], fresh_optimizer=True)
    assert not torch.equal(whole.model.embed_tokens.weight, restarted.model.embed_tokens.weight)
