"""`python -m selfrag_engine.tiny.train --init-from DIR` starts a further stage from DIR's weights and
tokenizer, and its record keeps the stages that made DIR."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from selfrag_engine.tiny.assets import TRAINING_FILE, default_model_dir
from selfrag_engine.tiny.train import TOKENIZER_FILES, main

MODEL = default_model_dir()
pytestmark = pytest.mark.skipif(not (MODEL / TRAINING_FILE).is_file(), reason="tiny_selfrag not present")


def test_a_stage_starts_from_the_weights_and_tokenizer_it_is_given(tmp_path):
    out = tmp_path / "stage"
    # No step: the stage's checkpoint must be its starting point, written back unchanged.
    main(["--out", str(out), "--init-from", str(MODEL), "--steps", "0", "--batch-size", "2",
          "--skill-fraction", "0.5", "--eval-questions", "2", "--eval-instructions", "2", "--eval-long-form", "0"])
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (MODEL / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text()) == json.loads((MODEL / "config.json").read_text())
    start, written = load_file(str(MODEL / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert start.keys() == written.keys()
    assert all(start[k].equal(written[k]) for k in start)

    record = json.loads((out / TRAINING_FILE).read_text())
    before = json.loads((MODEL / TRAINING_FILE).read_text())
    assert record["train_config"]["skill_fraction"] == 0.5
    assert record["earlier_stages"] == before.get("earlier_stages", []) + [
        {k: before[k] for k in ("command", "train_config", "training")}]


def test_a_stage_needs_a_directory_of_its_own(tmp_path):
    with pytest.raises(SystemExit, match="another --out"):
        main(["--out", str(MODEL), "--init-from", str(MODEL), "--steps", "0"])


def test_a_stage_refuses_a_shape_it_would_not_use(tmp_path):
    with pytest.raises(SystemExit, match="--hidden, --vocab cannot change them"):
        main(["--out", str(tmp_path / "stage"), "--init-from", str(MODEL), "--steps", "0", "--hidden", "128",
              "--vocab", "1000"])
    assert not (tmp_path / "stage" / "tokenizer.model").exists()
