"""Bad input of every kind gets a named error whose message names the field, file or value, never a raw
traceback, a silent coercion or a failure later on; the command line prints it on one line and exits 2."""
import json
import os
import re
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import selfrag_engine
from selfrag_engine import CheckpointError, Engine, RequestError, SamplingParams, TokenizerError
from selfrag_engine.config import LlamaConfig
from selfrag_engine.entrypoints.cli import main
from selfrag_engine.errors import SelfragEngineError
from selfrag_engine.retrieval.passages import CorpusError, read_passages
from selfrag_engine.testing import tiny_config
from selfrag_engine.tokenizer import Tokenizer
from selfrag_engine.weights.convert import convert_bin_to_safetensors
from selfrag_engine.weights.loader import load_model
from selfrag_engine.weights.quantize import quantize_checkpoint
from tests.helpers import tiny_checkpoint


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _cli(capsys, argv):
    """(exit status, stderr lines) of one command line run."""
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


# ---- config.json ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("num_attention_heads", 0), ("num_attention_heads", -4), ("rms_norm_eps", "abc"), ("rms_norm_eps", 0.0),
    ("rms_norm_eps", -1e-5), ("hidden_size", "64"), ("hidden_size", 64.0), ("hidden_size", True),
    ("max_position_embeddings", 0), ("num_hidden_layers", -1), ("num_hidden_layers", 0),
    ("num_key_value_heads", 0), ("vocab_size", 3.5), ("intermediate_size", None), ("rope_theta", "1e4"),
    ("tie_word_embeddings", "false"), ("bos_token_id", -1), ("eos_token_id", "2"), ("torch_dtype", ["float16"]),
])
def test_config_field_values_are_checked(field, value):
    cfg = {**tiny_config(), field: value}
    with pytest.raises(CheckpointError) as e:
        LlamaConfig.from_dict(cfg, source="cfg.json")
    assert field in str(e.value) and repr(value) in str(e.value) and "cfg.json" in str(e.value)


def test_rope_scaling_factor_is_checked():
    with pytest.raises(CheckpointError, match=r"rope_scaling.factor .*'2'"):
        LlamaConfig.from_dict({**tiny_config(), "rope_scaling": {"type": "linear", "factor": "2"}})
    with pytest.raises(CheckpointError, match="rope_scaling must be an object"):
        LlamaConfig.from_dict({**tiny_config(), "rope_scaling": 2.0})


def test_config_error_from_the_checkpoint_directory(tmp_path):
    # The one that used to load and then fail every request.
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 0}))
    with pytest.raises(CheckpointError, match=r"config.json: max_position_embeddings must be a positive "
                                              r"integer, got 0"):
        Engine.from_pretrained(path, progress=False)


@pytest.mark.parametrize("block_size", [0, -16, True, 16.0])
def test_block_size_is_checked(block_size):
    with pytest.raises(SelfragEngineError, match=f"block_size must be a positive integer, got {block_size!r}"):
        Engine.from_pretrained(tiny_checkpoint(seed=13), progress=False, block_size=block_size)


# ---- weight files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("outside", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_shard_index_cannot_point_outside_the_checkpoint(tmp_path, outside):
    path = _copy(tiny_checkpoint(seed=15, shards=2), tmp_path)
    shutil.copy(path / "model-00002-of-00002.safetensors", tmp_path / "outside.safetensors")
    if outside == "ABSOLUTE":
        outside = str(tmp_path / "outside.safetensors")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: (outside if v.endswith("00002.safetensors") else v)
                           for k, v in index["weight_map"].items()}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as e:
        load_model(path, progress=False)
    assert outside in str(e.value)


def test_shard_linked_from_outside_still_loads(tmp_path):
    # The Hugging Face cache's layout: each file of a snapshot is a link to a blob elsewhere.
    path = _copy(tiny_checkpoint(seed=15, shards=2), tmp_path)
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    shard = path / "model-00002-of-00002.safetensors"
    shutil.move(shard, blob)
    shard.symlink_to(blob)
    model = load_model(path, progress=False)
    assert torch.equal(model.model.norm.weight, load_file(blob)["model.norm.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(tmp_path, dtype, bad):
    path = _copy(tiny_checkpoint(seed=13, torch_dtype=dtype), tmp_path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name].view(-1)[1234] = bad
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{name}' .* holds NaN or infinite values"):
        load_model(path, progress=False)


def test_non_finite_fp8_weights_are_refused(tmp_path):
    src = tiny_checkpoint(seed=13)
    dst = tmp_path / "fp8"
    quantize_checkpoint(src, dst, progress=False)
    load_model(dst, progress=False)  # the clean copy loads
    tensors = load_file(dst / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    assert tensors[name].dtype == torch.float8_e4m3fn
    tensors[name].view(torch.uint8).view(-1)[77] = 0xFF  # e4m3fn's NaN
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"tensor '{name}' .* NaN"):
        load_model(dst, progress=False)


# ---- tokenizer and prompts -----------------------------------------------------------------------------


def test_tokenizer_error_is_exported_and_named():
    assert selfrag_engine.TokenizerError is TokenizerError
    assert issubclass(TokenizerError, CheckpointError) and issubclass(TokenizerError, SelfragEngineError)
    for cls in (CheckpointError, RequestError, selfrag_engine.CacheCapacityError, CorpusError):
        assert issubclass(cls, SelfragEngineError)


def test_missing_and_corrupt_tokenizer(tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    (path / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model" * 4)
    with pytest.raises(TokenizerError, match="tokenizer.model' is not a valid SentencePiece model"):
        Engine.from_pretrained(path, progress=False)
    (path / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.model' is missing"):
        Engine.from_pretrained(path, progress=False)


def test_lone_surrogate_in_a_prompt():
    tok = Tokenizer.from_pretrained(tiny_checkpoint(seed=13))
    with pytest.raises(RequestError, match=r"lone surrogate '\\udc80' at character 3"):
        tok.encode("abc\udc80def")
    with pytest.raises(RequestError, match="at character 0"):
        tok.encode("\ud83d")
    assert tok.encode("abc\U0001f600def") == tok.encode("abc\U0001f600def")  # a real astral character is fine


# ---- SamplingParams ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,shown", [
    (dict(logprobs=0), "0"), (dict(logprobs=True), "True"), (dict(logprobs=2.0), "2.0"),
    (dict(max_tokens=True), "True"), (dict(max_tokens=3.0), "3.0"),
    (dict(stop_token_ids=["x"]), "'x'"), (dict(stop_token_ids=[5, True]), "True"),
    (dict(stop_token_ids=[-1]), "-1"), (dict(stop_token_ids=5), "5"),
    (dict(stop=[1]), "[1]"), (dict(stop=[""]), "non-empty"), (dict(stop=b"x"), "b'x'"),
    (dict(temperature=float("inf")), "inf"), (dict(temperature=float("nan")), "nan"),
    (dict(temperature=True), "True"), (dict(temperature="1"), "'1'"),
    (dict(top_p=True), "True"), (dict(top_p=float("nan")), "nan"),
    (dict(top_k=2**40), str(2**40)), (dict(top_k=2**31), str(2**31)), (dict(top_k=True), "True"),
    (dict(seed=True), "True"), (dict(seed=1.5), "1.5"),
    (dict(ignore_eos=1), "1"), (dict(detokenize="no"), "'no'"),
], ids=repr)
def test_sampling_params_are_checked(kwargs, shown):
    (field,) = kwargs
    with pytest.raises(RequestError) as e:
        SamplingParams(**kwargs)
    assert str(e.value).startswith(f"{field} ") and shown in str(e.value)


def test_stop_none_means_no_stop_strings():
    p = SamplingParams(stop=None, stop_token_ids=None)
    assert p.stop == [] and p.stop_token_ids == []
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]


def test_largest_top_k_is_served_as_no_top_k():
    engine = Engine.from_pretrained(tiny_checkpoint(seed=13), progress=False)
    a = engine.generate(["the quick brown"], SamplingParams(max_tokens=6, seed=3, top_k=2**31 - 1))[0]
    b = engine.generate(["the quick brown"], SamplingParams(max_tokens=6, seed=3, top_k=0))[0]
    assert a.token_ids == b.token_ids


# ---- command line --------------------------------------------------------------------------------------


def test_cli_typo_in_model_is_one_line(capsys, tmp_path):
    rc, err = _cli(capsys, ["generate", "hi", "--model", str(tmp_path / "no-such-model"), "--quiet"])
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("selfrag-engine: error: ") and "no-such-model" in err[0] and "does not exist" in err[0]


def test_cli_corrupt_tokenizer_is_one_line(capsys, tmp_path):
    path = _copy(tiny_checkpoint(seed=13), tmp_path)
    (path / "tokenizer.model").write_bytes(b"garbage")
    rc, err = _cli(capsys, ["generate", "hi", "--model", str(path), "--quiet"])
    assert rc == 2 and len(err) == 1 and "tokenizer.model" in err[0]


def test_cli_logprobs_zero_and_bad_dtype(capsys):
    path = str(tiny_checkpoint(seed=13))
    rc, err = _cli(capsys, ["generate", "hi", "--model", path, "--quiet", "--logprobs", "0"])
    assert rc == 2 and len(err) == 1 and "logprobs" in err[0]
    rc, err = _cli(capsys, ["generate", "hi", "--model", path, "--quiet", "--dtype", "float13"])
    assert rc == 2 and len(err) == 1 and "float13" in err[0]


def test_cli_subcommands_print_named_errors_on_one_line(capsys, tmp_path):
    corpus = tmp_path / "corpus.tsv"
    corpus.write_bytes(b"id\ttext\ttitle\n1\tok\tT\n")
    missing = str(tmp_path / "missing.tsv")
    runs = [
        ["index", "build", "--passages", missing, "--out", str(tmp_path / "idx"), "--quiet"],
        ["index", "search", "q", "--index", str(tmp_path / "no-index")],
        ["ask", "who?", "--model", str(tmp_path / "no-model"), "--passages", str(corpus), "--quiet"],
        ["ask", "who?", "--model", str(tiny_checkpoint(seed=13)), "--passages", missing, "--quiet"],
        ["eval", "--task", "popqa", "--input", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path / "m"),
         "--quiet"],
        ["quantize", str(tmp_path / "no-src"), str(tmp_path / "dst"), "--quiet"],
    ]
    for argv in runs:
        rc, err = _cli(capsys, argv)
        assert rc == 2 and len(err) == 1 and err[0].startswith("selfrag-engine: error: "), (argv, err)


# ---- corpus files --------------------------------------------------------------------------------------


def test_non_utf8_tsv_names_file_and_byte_offset(tmp_path):
    good = "id\ttext\ttitle\n" + "".join(f"{i}\tpassage number {i} caf\u00e9\tT{i}\n" for i in range(5000))
    data = good.encode() + b"5000\tbad \xff byte\tT\n"
    path = tmp_path / "corpus.tsv"
    path.write_bytes(data)
    with pytest.raises(CorpusError) as e:
        read_passages(path)
    offset = data.index(b"\xff")
    assert str(path) in str(e.value) and f"byte offset {offset} " in str(e.value)
    line = data[:offset].count(b"\n") + 1
    assert f"(line {line})" in str(e.value)
    jsonl = tmp_path / "corpus.jsonl"
    data = b'{"text": "a"}\n{"text": "\xc3("}\n'
    jsonl.write_bytes(data)
    offset = data.index(b"\xc3")
    with pytest.raises(CorpusError, match=rf"byte offset {offset} \(line 2\)"):
        read_passages(jsonl)


# ---- convert and quantize ------------------------------------------------------------------------------


def test_convert_onto_itself_is_refused(tmp_path, capsys):
    src = _copy(tiny_checkpoint(seed=12, weight_format="bin"), tmp_path)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(CheckpointError, match="is the source checkpoint itself"):
        convert_bin_to_safetensors(src, src, progress=False)
    rc, err = _cli(capsys, ["convert", str(src), str(src), "--quiet"])
    assert rc == 2 and len(err) == 1
    assert sorted(p.name for p in src.iterdir()) == before


def test_failed_convert_leaves_no_destination(tmp_path):
    src = _copy(tiny_checkpoint(seed=12, weight_format="bin", shards=2), tmp_path)
    second = src / "pytorch_model-00002-of-00002.bin"
    second.write_bytes(second.read_bytes()[:100])  # the first shard converts, then this one fails
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        convert_bin_to_safetensors(src, dst, progress=False)
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left either


def test_failed_quantize_leaves_no_destination(tmp_path):
    """A non-finite weight late in the checkpoint fails the quantize after earlier shards were written: the
    error names the tensor and neither the destination nor a staging directory is left."""
    from safetensors.torch import load_file, save_file

    src = _copy(tiny_checkpoint(seed=14, shards=2), tmp_path)
    last = sorted(src.glob("model-*.safetensors"))[-1]
    tensors = load_file(last)
    name = next(n for n in sorted(tensors) if n.endswith("mlp.down_proj.weight"))
    tensors[name][3, 5] = float("inf")
    save_file(tensors, last, metadata={"format": "pt"})
    dst = tmp_path / "fp8"
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}'.*row 3 has non-finite values"):
        quantize_checkpoint(src, dst, shard_size_bytes=4096, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        quantize_checkpoint(tiny_checkpoint(seed=14), dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]


def test_convert_into_a_non_empty_directory_is_refused(tmp_path):
    src = tiny_checkpoint(seed=12, weight_format="bin")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty directory"):
        convert_bin_to_safetensors(src, dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["notes.txt"]
    (dst / "notes.txt").unlink()
    convert_bin_to_safetensors(src, dst, progress=False)  # an empty directory is fine
    assert (dst / "model.safetensors").is_file()


def test_written_files_have_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        conv = convert_bin_to_safetensors(tiny_checkpoint(seed=12, weight_format="bin"), tmp_path / "conv",
                                          progress=False)
        quant = tmp_path / "quant"
        quantize_checkpoint(tiny_checkpoint(seed=13), quant, progress=False)
    finally:
        os.umask(old)
    for f in (conv / "model.safetensors", quant / "model.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    assert stat.S_IMODE(conv.stat().st_mode) == 0o750


def test_readme_generate_example_passes_a_real_prompt():
    """The README's shell line, run by bash up to the prompt argument, hands over the prompt format itself
    (newlines, not backslash-n)."""
    import re
    import subprocess
    from pathlib import Path

    from selfrag_engine.selfrag.prompts import format_prompt

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = [ln for ln in readme.splitlines() if "selfrag-engine generate --model " in ln]
    assert len(lines) >= 2
    for line in lines:
        (args,) = re.findall(r"\$'[^']*'", line)
        shown = subprocess.run(["bash", "-c", f"printf '%s' {args}"], capture_output=True, text=True, check=True)
        instruction = re.search(r"Instruction:\\n(.*?)\\n", args).group(1)
        assert shown.stdout == format_prompt(instruction)


def test_selfrag_options_are_named_errors():
    """What a user of the algorithms or the server can get wrong is a RequestError, not a bare ValueError."""
    from selfrag_engine.selfrag.decisions import check_mode
    from selfrag_engine.selfrag.prompts import format_prompt
    from selfrag_engine.selfrag.scoring import ScoringConfig

    with pytest.raises(RequestError, match="mode"):
        check_mode("sometimes")
    with pytest.raises(RequestError, match="empty"):
        format_prompt("   ")
    with pytest.raises(RequestError, match="gate"):
        ScoringConfig(gate="vote")
    with pytest.raises(RequestError, match="threshold"):
        ScoringConfig(threshold=float("nan"))
    with pytest.raises(RequestError, match="form"):
        ScoringConfig.released(form="medium")
    # The one mapping of a query's options (server, C++ API, ask, evaluate): the long form's tree options in a
    # short-form query are refused, not dropped.
    from selfrag_engine.selfrag.options import QueryOptions

    for name in ("beam_width", "max_depth"):
        with pytest.raises(RequestError, match=name):
            QueryOptions.from_mapping({"form": "short", name: 2})
    assert QueryOptions.from_mapping({"form": "long", "beam_width": 2}).beam_width == 2
