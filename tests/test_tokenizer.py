"""The tokenizer against transformers' slow LlamaTokenizer on the same files, and its error cases."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfrag_engine.selfrag.prompts import GROUPS, PARAGRAPH_CLOSE, PARAGRAPH_OPEN
from selfrag_engine.vocab import ADDED_TOKENS as SELFRAG_ADDED_TOKENS, ADDITIONAL_SPECIAL_TOKENS
from selfrag_engine.testing import (train_sentencepiece,
                                    write_tokenizer)
from selfrag_engine.tokenizer import Tokenizer, TokenizerError, UnknownTokenError
from tests.helpers import slow_llama_tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _hf(path: Path, legacy: bool = True):
    LlamaTokenizer = slow_llama_tokenizer()
    if legacy:
        return LlamaTokenizer.from_pretrained(path)
    # transformers builds the non-legacy model (dummy prefix off) with protobuf, which this environment may
    # lack; the same model is the original with NormalizerSpec{add_dummy_prefix: false} merged in.
    def processor(self, from_slow=False):
        proto = Path(self.vocab_file).read_bytes() + b"\x1a\x02\x18\x00"
        return spm.SentencePieceProcessor(model_proto=proto)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(LlamaTokenizer, "get_spm_processor", processor)
        tok = LlamaTokenizer.from_pretrained(path)
    assert not tok.sp_model.encode("Hello", out_type=str)[0].startswith("▁")
    return tok


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def _edit_json(file: Path, edit) -> None:
    obj = json.loads(file.read_text())
    edit(obj)
    file.write_text(json.dumps(obj))


@pytest.fixture(scope="session")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {"legacy": root / "legacy", "nonlegacy": root / "nonlegacy", "big": root / "big"}
    write_tokenizer(dirs["legacy"])
    write_tokenizer(dirs["nonlegacy"], legacy=False)
    write_tokenizer(dirs["big"], vocab_pieces=1000, seed=1)

    # The published Self-RAG layout (transformers 4.31): no added_tokens_decoder; ids from added_tokens.json,
    # the additional special tokens and pad from special_tokens_map.json; special tokens saved as objects.
    old = _copy(dirs["legacy"], root / "published_layout")

    def to_old(cfg):
        for key in ("added_tokens_decoder", "additional_special_tokens", "spaces_between_special_tokens"):
            del cfg[key]
        for key in ("bos_token", "eos_token", "unk_token"):
            cfg[key] = {"__type": "AddedToken", "content": cfg[key], "lstrip": False, "normalized": True,
                        "rstrip": False, "single_word": False}
        cfg["pad_token"] = None
    _edit_json(old / "tokenizer_config.json", to_old)
    dirs["published_layout"] = old

    cleanup = _copy(dirs["legacy"], root / "cleanup")
    _edit_json(cleanup / "tokenizer_config.json", lambda c: c.update(clean_up_tokenization_spaces=True))
    dirs["cleanup"] = cleanup

    # Strip flags on added tokens eat the whitespace next to them.
    strip = _copy(dirs["legacy"], root / "strip")

    def flags(cfg):
        for entry in cfg["added_tokens_decoder"].values():
            if entry["content"] == "[Retrieval]":
                entry.update(lstrip=True, rstrip=True)
            if entry["content"] == "</paragraph>":
                entry.update(lstrip=True)
    _edit_json(strip / "tokenizer_config.json", flags)
    dirs["strip"] = strip
    return dirs


@pytest.fixture(scope="session")
def ours(tok_dirs):
    cache = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            cache[name] = Tokenizer.from_pretrained(tok_dirs[name])
        return cache[name]
    return get


@pytest.fixture(scope="session")
def pair(tok_dirs, ours):
    """(our tokenizer, transformers' slow one) on the same files; the test skips where the oracle is missing."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = (ours(name), _hf(tok_dirs[name], legacy=name != "nonlegacy"))
        return cache[name]
    return get


# ---- generated strings -----------------------------------------------------------------------------------

_WORDS = ["the", "The", "of", "retrieval", "Hamlet", "answer", "x", "QUIZ", "state", "évidence", "café", "naïve",
          "日本", "東京", "über", "😀", "🚀👍", "ß", "½", "—", "“quoted”", "don't", "it's", "I'm", "1234", "3.14",
          "2023-10-11", "50%", "(a)", "a,b", "e.g.", "!?", "#", "▁", "\u00a0", "\u200b", "Ω≈ç√", "ab\u0301"]
_SPACES = [" ", " ", " ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\n ", "\r\n", ""]
_ADDED = list(SELFRAG_ADDED_TOKENS) + ["<s>", "</s>", "<unk>"]
_FRAGMENTS = ["[Retr", "<para", "graph>", "[Utility:", "]", "[", "<", ">", "</", "[No ", "Retrieval]", "<pa", "/s>"]
_TEMPLATES = [
    "### Instruction:\n{q}\n\n### Response:\n",
    "### Instruction:\n{q}\n\n### Input:\n{p}\n\n### Response:\n",
    "### Instruction:\n{q}\n\n### Response:\n[Retrieval]<paragraph>{p}\n{r}</paragraph>",
    "[Retrieval]<paragraph>{p}\n{r}</paragraph>[Relevant]{q}[Fully supported][Utility:5]</s>",
    "[No Retrieval]{q}[Utility:4]</s>",
    "[Irrelevant]{q}[Continue to Use Evidence] {r}[Partially supported][No support / Contradictory]",
    "{q}<paragraph>{p}</paragraph>{r}",
]


def _phrase(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        r = rng.random()
        out.append(rng.choice(_WORDS) if r < 0.7 else rng.choice(_ADDED) if r < 0.85 else rng.choice(_FRAGMENTS))
        out.append(rng.choice(_SPACES))
    return "".join(out)


def mixed_strings(count: int = 300, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", "\t", "a", " a", "a ", "  a  b  ", "\n\nx\n", "[Retrieval]", "[Retrieval][Relevant]",
           "[Retrieval]<paragraph>Title\ntext</paragraph>[Relevant]answer[Fully supported][Utility:5]</s>",
           "<paragraph>Title", "x<paragraph> y", "x </paragraph>\n[Relevant] ok", "<s><s></s>", "<pad><pad>x",
           "😀", " 😀 ", "日本語のテキスト", "▁leading meta", "tail meta▁"]
    while len(out) < count:
        kind = rng.random()
        if kind < 0.4:
            text = rng.choice(_TEMPLATES).format(q=_phrase(rng, rng.randint(1, 6)), p=_phrase(rng, rng.randint(1, 4)),
                                                 r=_phrase(rng, rng.randint(0, 4)))
        else:
            text = _phrase(rng, rng.randint(1, 10))
        if rng.random() < 0.3:
            text = rng.choice(_SPACES) + text
        if rng.random() < 0.3:
            text += rng.choice(_SPACES)
        out.append(text)
    return out


STRINGS = mixed_strings()


# ---- parity with transformers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["legacy", "nonlegacy", "big", "published_layout", "cleanup", "strip"])
def test_encode_decode_parity(pair, name):
    ours, hf = pair(name)
    strings = STRINGS if name in ("legacy", "nonlegacy") else STRINGS[:120]
    for text in strings:
        ids = hf.encode(text)
        assert ours.encode(text) == ids, (name, text)
        assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False), (name, text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), \
                (name, text, skip)
            assert ours.decode(ids[1:], skip_special_tokens=skip) == hf.decode(ids[1:], skip_special_tokens=skip), \
                (name, text, skip)


@pytest.mark.parametrize("name", ["legacy", "nonlegacy"])
def test_decode_parity_on_random_ids(pair, name):
    """Arbitrary id sequences: byte pieces that do not form UTF-8, special tokens anywhere, runs of them."""
    ours, hf = pair(name)
    rng = random.Random(7)
    specials = sorted(ours.special_ids)
    for _ in range(200):
        ids = [rng.choice(specials) if rng.random() < 0.25 else rng.randrange(ours.vocab_size)
               for _ in range(rng.randint(1, 24))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_published_format_examples(pair):
    ours, hf = pair("legacy")
    r = ours.reflection_token_ids()
    ids = ours.encode("[Retrieval]<paragraph>Title\ntext</paragraph>[Relevant]answer[Fully supported][Utility:5]</s>")
    assert ids[:3] == [ours.bos_id, r.retrieval[0], r.paragraph_open]
    assert ours.id_to_token(ids[3]).startswith("▁")  # legacy: the span after an added token gets the '▁'
    assert ids[-3:] == [r.grounding[0], r.utility[4], ours.eos_id]
    # transformers' slow decode puts spaces around the additional special tokens.
    assert ours.decode(ids) == hf.decode(ids) == (
        "<s> [Retrieval] <paragraph> Title\ntext </paragraph> [Relevant] answer [Fully supported] [Utility:5] </s>")
    assert ours.decode(ids, skip_special_tokens=True) == "Title\ntext answer"
    nonlegacy, _ = pair("nonlegacy")
    assert not nonlegacy.tokenize("<paragraph>Title")[1].startswith("▁")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=6), st.sampled_from(_ADDED + _FRAGMENTS + _SPACES + _WORDS)),
                max_size=10))
def test_parity_property(pair, parts):
    text = "".join(parts)
    for name in ("legacy", "nonlegacy"):
        ours, hf = pair(name)
        ids = hf.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters="▁"),
               min_size=1, max_size=4),
       st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="▁"), max_size=30))
def test_plain_text_round_trips(ours, head, tail):
    """Text without added tokens comes back unchanged when it does not start with whitespace (the dummy
    prefix makes a leading space ambiguous); byte fallback covers every character."""
    ours = ours("legacy")
    text = head + tail
    if any(t in text for t in _ADDED):
        return
    assert ours.decode(ours.encode(text, add_bos=False)) == text
    assert ours.unk_id not in ours.encode(text)


# ---- vocabulary ------------------------------------------------------------------------------------------

def test_added_token_ids_follow_the_pieces(pair):
    ours, hf = pair("legacy")
    pieces = ours.num_pieces
    assert pieces == 320 and ours.vocab_size == pieces + 16 == len(hf)
    assert ours.added_tokens == {t: pieces + k for k, t in enumerate(SELFRAG_ADDED_TOKENS)}
    for t, i in ours.added_tokens.items():
        assert hf.convert_tokens_to_ids(t) == i and ours.token_to_id(t) == i and ours.id_to_token(i) == t
    assert (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2, pieces + 15)
    assert ours.special_ids == set(hf.all_special_ids)
    for i in range(pieces):
        assert ours.id_to_token(i) == hf.convert_ids_to_tokens(i)
        assert ours.token_to_id(ours.id_to_token(i)) == i


def test_published_layout_reads_special_tokens_map(pair):
    ours, hf = pair("published_layout")
    assert ours.pad_id == ours.num_pieces + 15 == hf.pad_token_id
    assert ours.special_ids == set(hf.all_special_ids) and len(ours.special_ids) == 19
    assert ours.added_tokens == pair("legacy")[0].added_tokens


def test_unknown_tokens(ours):
    ours = ours("legacy")
    with pytest.raises(KeyError, match="neither an added token nor a SentencePiece piece"):
        ours.token_to_id("[NotAToken]")
    with pytest.raises(UnknownTokenError, match="out of the vocabulary"):
        ours.id_to_token(ours.vocab_size)
    with pytest.raises(UnknownTokenError):
        ours.decode([5, -1])


def test_reflection_token_ids(ours):
    ours = ours("legacy")
    r = ours.reflection_token_ids()
    groups = r.groups()
    assert list(groups) == list(GROUPS)
    for name, tokens in GROUPS.items():
        assert groups[name] == tuple(ours.token_to_id(t) for t in tokens)
    assert r.retrieval == (ours.token_to_id("[Retrieval]"), ours.token_to_id("[No Retrieval]"),
                           ours.token_to_id("[Continue to Use Evidence]"))
    assert r.utility == tuple(range(ours.num_pieces + 7, ours.num_pieces + 12))
    assert r.paragraph_open == ours.token_to_id(PARAGRAPH_OPEN)
    assert r.paragraph_close == ours.token_to_id(PARAGRAPH_CLOSE)
    with pytest.raises(AttributeError):
        r.paragraph_open = 0  # frozen

    plain = Tokenizer(train_sentencepiece(), [])
    with pytest.raises(TokenizerError, match=r"not a Self-RAG tokenizer.*\[Retrieval\]"):
        plain.reflection_token_ids()
    assert plain.vocab_size == 320 and plain.added_tokens == {} and plain.pad_id is None


def test_encode_batch_and_eos(pair):
    ours, hf = pair("legacy")
    texts = STRINGS[:10]
    assert ours.encode_batch(texts) == [hf.encode(t) for t in texts]
    assert ours.encode("hi", add_bos=False, add_eos=True) == hf.encode("hi", add_special_tokens=False) + [2]


# ---- errors ----------------------------------------------------------------------------------------------

def _broken(tok_dirs, tmp_path, **edits) -> Path:
    d = _copy(tok_dirs["legacy"], tmp_path / "tok")
    for name, edit in edits.items():
        file = d / name.replace("__", ".")
        if edit is None:
            file.unlink()
        elif isinstance(edit, (str, bytes)):
            file.write_bytes(edit if isinstance(edit, bytes) else edit.encode())
        else:
            _edit_json(file, edit)
    return d


def _drop_decoder(cfg):
    del cfg["added_tokens_decoder"]


@pytest.mark.parametrize("edits, message", [
    ({"tokenizer__model": None}, r"tokenizer\.model' is missing"),
    ({"tokenizer__model": b"not a model"}, r"tokenizer\.model' is not a valid SentencePiece model"),
    ({"tokenizer_config__json": "{not json"}, r"tokenizer_config\.json' is not valid JSON"),
    ({"tokenizer_config__json": "[1, 2]"}, r"tokenizer_config\.json' does not hold a JSON object"),
    ({"added_tokens__json": '{"[A]": 336, "[A]": 337}'}, r"added_tokens\.json' is not valid JSON.*twice"),
    ({"tokenizer_config__json": _drop_decoder, "added_tokens__json": '{"[A]": 340, "[B]": 340}'},
     r"added_tokens\.json': id 340 is given to two added tokens"),
    ({"tokenizer_config__json": _drop_decoder, "added_tokens__json": '{"[A]": "x"}'},
     r"added_tokens\.json': added token '\[A\]' has an invalid id 'x'"),
    ({"tokenizer_config__json": _drop_decoder, "added_tokens__json": '{"[A]": 5}'},
     r"added_tokens\.json': added token '\[A\]' has id 5, which is the SentencePiece piece"),
    ({"tokenizer_config__json": _drop_decoder, "special_tokens_map__json": "{"},
     r"special_tokens_map\.json' is not valid JSON"),
    ({"tokenizer_config__json": lambda c: c["added_tokens_decoder"].update({"400": {"content": "[Retrieval]"}})},
     r"tokenizer_config\.json': added token '\[Retrieval\]' has two ids, 321 and 400"),
    ({"tokenizer_config__json": lambda c: c["added_tokens_decoder"].update({"0321": {"content": "[X]"}})},
     r"added_tokens_decoder' gives id 321 twice"),
    ({"tokenizer_config__json": lambda c: c["added_tokens_decoder"].update({"-3": {"content": "[X]"}})},
     r"invalid id '-3'"),
    ({"tokenizer_config__json": lambda c: c["added_tokens_decoder"].update({"400": {"special": True}})},
     r"entry 400 needs a non-empty 'content'"),
    ({"added_tokens__json": lambda a: a.update({"[Retrieval]": 340})},
     r"added_tokens\.json' gives '\[Retrieval\]' id 340, but 'added_tokens_decoder'"),
    ({"tokenizer_config__json": lambda c: c.update(bos_token=5)}, r"'bos_token' must be a string"),
])
def test_errors_name_the_file_and_problem(tok_dirs, tmp_path, edits, message):
    d = _broken(tok_dirs, tmp_path, **edits)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_pretrained(d)


def test_missing_directory(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    assert issubclass(TokenizerError, ValueError)


def test_only_the_model_file(tok_dirs, tmp_path):
    """Without any JSON file: the Llama defaults (<s>, </s>, <unk> matched in text), no added tokens."""
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(tok_dirs["legacy"] / "tokenizer.model", d)
    ours, hf = Tokenizer.from_pretrained(d), slow_llama_tokenizer().from_pretrained(d, legacy=True)
    assert ours.vocab_size == 320 and ours.pad_id is None
    for text in STRINGS[:60]:
        ids = hf.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert set(ADDITIONAL_SPECIAL_TOKENS).isdisjoint(ours.added_tokens)
