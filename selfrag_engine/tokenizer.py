"""The Llama SentencePiece tokenizer with added tokens, read from a Hugging Face tokenizer directory.

    tok = Tokenizer.from_pretrained("path/to/checkpoint")
    ids = tok.encode("### Instruction:\\nWho wrote Hamlet?\\n\\n### Response:\\n")
    text = tok.decode(ids[1:])

Encoding and decoding reproduce the slow `transformers.LlamaTokenizer` (the class the published Self-RAG
checkpoint was trained and evaluated with), quirks included, so that token ids and text agree with the
reference pipeline:

- Added tokens (and the special tokens) are matched atomically in the text, leftmost and longest first; the
  text between them is encoded by SentencePiece one span at a time. With `legacy` (the default, and the
  Self-RAG files) every span gets SentencePiece's dummy-prefix '▁', so text right after an added token starts
  with '▁' (`<paragraph>Title` -> `<paragraph>`, `▁Title`). Without it, only the start of the text gets one.
- Decoding joins the spans around additional special tokens with single spaces
  (`[Retrieval]<paragraph>Title` decodes to `[Retrieval] <paragraph> Title`): transformers' slow decode
  defaults to `spaces_between_special_tokens=True` and ignores the value in tokenizer_config.json.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from selfrag_engine.detokenizer import IncrementalDetokenizer
from selfrag_engine.errors import RequestError, TokenizerError
from selfrag_engine.vocab import GROUPS, PARAGRAPH_CLOSE, PARAGRAPH_OPEN

SPIECE_UNDERLINE = "▁"
_SURROGATE = re.compile("[\ud800-\udfff]")
# A serialized NormalizerSpec {add_dummy_prefix: false} as ModelProto field 3. Protobuf merges repeated
# occurrences of a message field, so appending it to a model turns the dummy prefix off, which is what
# transformers does (via protobuf's MergeFrom) for a non-legacy Llama tokenizer.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order; `additional_special_tokens` is handled apart.
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# LlamaTokenizer's defaults when the files do not name a special token.
_SPECIAL_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


class UnknownTokenError(KeyError):
    """A token string or id that is not in the vocabulary."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


@dataclass(frozen=True)
class ReflectionTokenIds:
    """Ids of the Self-RAG reflection tokens; each group in the order of `vocab.GROUPS`."""
    retrieval: tuple[int, int, int]  # [Retrieval], [No Retrieval], [Continue to Use Evidence]
    relevance: tuple[int, int]  # [Relevant], [Irrelevant]
    grounding: tuple[int, int, int]  # [Fully supported], [Partially supported], [No support / Contradictory]
    utility: tuple[int, int, int, int, int]  # [Utility:1] .. [Utility:5]
    paragraph_open: int
    paragraph_close: int

    def groups(self) -> dict[str, tuple[int, ...]]:
        return {name: getattr(self, name) for name in GROUPS}


class Tokenizer:
    def __init__(self, sp_model_proto: bytes, added: Sequence[AddedToken], *, bos_token: str | None = "<s>",
                 eos_token: str | None = "</s>", unk_token: str | None = "<unk>", pad_token: str | None = None,
                 other_special_tokens: Sequence[str] = (), additional_special_tokens: Sequence[str] = (),
                 legacy: bool = True, add_prefix_space: bool = True, clean_up_tokenization_spaces: bool = False,
                 source: str = "tokenizer"):
        """`added`: tokens matched atomically, with their ids (a special token that is a SentencePiece piece,
        like `<s>`, need not be listed). Special tokens are named by content; one that is neither added nor a
        piece gets the next free id, as transformers gives it."""
        self.legacy = legacy
        self.add_prefix_space = add_prefix_space
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._sp = _load_sp(sp_model_proto if legacy else sp_model_proto + _NO_DUMMY_PREFIX, source)
        self._num_pieces = self._sp.get_piece_size()

        self._added: dict[str, AddedToken] = {}
        self._added_by_id: dict[int, AddedToken] = {}
        for tok in added:
            self._register(tok, source)
        named = [bos_token, eos_token, unk_token, pad_token, *other_special_tokens, *additional_special_tokens]
        for content in named:
            if content is not None and content not in self._added:
                piece_id = self._piece_id(content)
                new_id = piece_id if piece_id is not None else self.vocab_size
                self._register(AddedToken(content, new_id), source)

        self._bos_token, self._eos_token, self._unk_token, self._pad_token = bos_token, eos_token, unk_token, pad_token
        # transformers' all_special_tokens: what skip_special_tokens drops.
        self._special_tokens = [t for t in named if t is not None]
        self._special_ids = {self._added[t].id for t in self._special_tokens}
        # Decoding puts the spans between these apart: added tokens that are not special, and additional special
        # tokens past the SentencePiece pieces.
        self._spaced_tokens = ({t for t in self._added if t not in self._special_tokens}
                               | {t for t in additional_special_tokens if self._added[t].id >= self._num_pieces})
        contents = sorted(self._added, key=len, reverse=True)
        # Alternatives tried longest first make the leftmost match also the longest one.
        self._pattern = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None
        self._unk_token_length = len(self._sp.encode(unk_token or "")) if not legacy else 0

    # ---- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Reads `tokenizer.model` and the added and special tokens from `tokenizer_config.json`
        (`added_tokens_decoder`), or, in the older layout without it, from `added_tokens.json` and
        `special_tokens_map.json`, with transformers' precedence between them."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"tokenizer directory '{path}' does not exist")
        model_file = path / "tokenizer.model"
        if not model_file.is_file():
            raise TokenizerError(f"'{model_file}' is missing: a Llama tokenizer needs its SentencePiece model")
        proto = model_file.read_bytes()
        _load_sp(proto, str(model_file))

        config_file, map_file, added_file = (path / "tokenizer_config.json", path / "special_tokens_map.json",
                                             path / "added_tokens.json")
        config = _read_json(config_file) or {}
        added_json = _read_json(added_file)
        specials = {k: _content(config[k], config_file, k) if k in config else _SPECIAL_DEFAULTS.get(k)
                    for k in _SPECIAL_ATTRS}
        additional = [_content(t, config_file, "additional_special_tokens")
                      for t in _list(config.get("additional_special_tokens"), config_file)]

        if "added_tokens_decoder" in config:
            source = config_file
            added = _parse_added_tokens_decoder(config["added_tokens_decoder"], config_file)
            if added_json is not None:
                _check_agrees(added_json, added, added_file, config_file)
        else:
            # The older layout: special_tokens_map.json overrides tokenizer_config.json, and added_tokens.json
            # gives the ids.
            source = added_file
            special_map = _read_json(map_file) or {}
            for k in _SPECIAL_ATTRS:
                if k in special_map:
                    specials[k] = _content(special_map[k], map_file, k)
            for t in _list(special_map.get("additional_special_tokens"), map_file):
                t = _content(t, map_file, "additional_special_tokens")
                if t not in additional:
                    additional.append(t)
            added = [AddedToken(content, i) for content, i in _parse_added_tokens_json(added_json, added_file)]

        legacy = config.get("legacy")
        return cls(
            proto, added, bos_token=specials["bos_token"], eos_token=specials["eos_token"],
            unk_token=specials["unk_token"], pad_token=specials["pad_token"],
            other_special_tokens=[specials[k] for k in ("sep_token", "cls_token", "mask_token") if specials[k]],
            additional_special_tokens=additional, legacy=True if legacy is None else bool(legacy),
            add_prefix_space=bool(config.get("add_prefix_space", True)),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            source=str(source))

    def _register(self, tok: AddedToken, source: str) -> None:
        if isinstance(tok.id, bool) or not isinstance(tok.id, int) or tok.id < 0:
            raise TokenizerError(f"'{source}': added token {tok.content!r} has an invalid id {tok.id!r}")
        if tok.content in self._added and self._added[tok.content].id != tok.id:
            raise TokenizerError(f"'{source}': added token {tok.content!r} has two ids, "
                                 f"{self._added[tok.content].id} and {tok.id}")
        other = self._added_by_id.get(tok.id)
        if other is not None and other.content != tok.content:
            raise TokenizerError(f"'{source}': id {tok.id} is given to two added tokens, {other.content!r} and "
                                 f"{tok.content!r}")
        if tok.id < self._num_pieces and self._sp.id_to_piece(tok.id) != tok.content:
            raise TokenizerError(f"'{source}': added token {tok.content!r} has id {tok.id}, which is the "
                                 f"SentencePiece piece {self._sp.id_to_piece(tok.id)!r}")
        self._added[tok.content] = tok
        self._added_by_id[tok.id] = tok

    def _piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    # ---- vocabulary ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the added tokens past them (the model's embedding rows)."""
        return max(self._num_pieces, max(self._added_by_id, default=-1) + 1)

    @property
    def num_pieces(self) -> int:
        return self._num_pieces

    @property
    def bos_id(self) -> int | None:
        return self._special_id(self._bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._special_id(self._eos_token)

    @property
    def unk_id(self) -> int | None:
        return self._special_id(self._unk_token)

    @property
    def pad_id(self) -> int | None:
        return self._special_id(self._pad_token)

    def _special_id(self, token: str | None) -> int | None:
        return None if token is None else self._added[token].id

    @property
    def added_tokens(self) -> dict[str, int]:
        """The tokens past the SentencePiece pieces (what added_tokens.json lists), in id order."""
        return {t.content: t.id for t in sorted(self._added.values(), key=lambda t: t.id)
                if t.id >= self._num_pieces}

    @property
    def special_ids(self) -> set[int]:
        """Ids of the special tokens (bos, eos, unk, pad, additional): what skip_special_tokens drops."""
        return set(self._special_ids)

    def token_to_id(self, token: str) -> int:
        if token in self._added:
            return self._added[token].id
        i = self._piece_id(token)
        if i is None:
            raise UnknownTokenError(f"{token!r} is neither an added token nor a SentencePiece piece")
        return i

    def id_to_token(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._added_by_id:
            return self._added_by_id[token_id].content
        if 0 <= token_id < self._num_pieces:
            return self._sp.id_to_piece(token_id)
        raise UnknownTokenError(f"token id {token_id} is out of the vocabulary (size {self.vocab_size})")

    def reflection_token_ids(self) -> ReflectionTokenIds:
        """Ids of the Self-RAG reflection tokens, looked up by content."""
        names = [t for group in GROUPS.values() for t in group] + [PARAGRAPH_OPEN, PARAGRAPH_CLOSE]
        missing = [t for t in names if t not in self._added]
        if missing:
            raise TokenizerError(f"not a Self-RAG tokenizer: the added tokens lack {', '.join(missing)}")

        def ids(group: str) -> tuple[int, ...]:
            return tuple(self._added[t].id for t in GROUPS[group])

        return ReflectionTokenIds(
            retrieval=ids("retrieval"), relevance=ids("relevance"), grounding=ids("grounding"),
            utility=ids("utility"), paragraph_open=self._added[PARAGRAPH_OPEN].id,
            paragraph_close=self._added[PARAGRAPH_CLOSE].id)

    # ---- encoding ------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = [self._added[p].id if p in self._added else self._sp.piece_to_id(p) for p in self.tokenize(text)]
        if add_bos:
            ids.insert(0, self._required(self._bos_token, "bos"))
        if add_eos:
            ids.append(self._required(self._eos_token, "eos"))
        return ids

    def encode_batch(self, texts: Iterable[str], add_bos: bool = True, add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def _required(self, token: str | None, what: str) -> int:
        if token is None:
            raise TokenizerError(f"this tokenizer has no {what} token")
        return self._added[token].id

    def tokenize(self, text: str) -> list[str]:
        """Token strings: added tokens and SentencePiece pieces, without bos/eos."""
        surrogate = _SURROGATE.search(text)
        if surrogate is not None:
            # A lone surrogate has no UTF-8 form, so SentencePiece cannot take the text at all.
            raise RequestError(f"the text has a lone surrogate {surrogate.group()!r} at character "
                               f"{surrogate.start()}: not valid Unicode text")
        if not self.legacy and text:
            text = text.replace(SPIECE_UNDERLINE, " ")
            if self.add_prefix_space:
                text = SPIECE_UNDERLINE + text
        parts = [p for p in self._pattern.split(text) if p] if self._pattern else [text]
        self._apply_strip_flags(parts)
        pieces: list[str] = []
        for part in parts:
            if not part:
                continue
            if part in self._added:
                pieces.append(part)
            else:
                pieces.extend(self._encode_span(part))
        if (not self.legacy and len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE
                and pieces[1] in self._special_tokens):
            pieces = pieces[1:]
        return pieces

    def _apply_strip_flags(self, parts: list[str]) -> None:
        """An added token's lstrip/rstrip eat the whitespace beside it; a single_word token next to a word
        character is left to be plain text. In place, neighbour by neighbour, as transformers does."""
        for i, part in enumerate(parts):
            tok = self._added.get(part)
            if tok is None or not (tok.lstrip or tok.rstrip or tok.single_word):
                continue
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if tok.rstrip and right:
                parts[i + 1] = right.lstrip()
            if tok.lstrip and left:
                parts[i - 1] = left.rstrip()
            if tok.single_word and left and left[-1] != " ":
                parts[i - 1] += part
                parts[i] = ""
            elif tok.single_word and right and right[0] != " ":
                parts[i + 1] = part + parts[i + 1]
                parts[i] = ""

    def _encode_span(self, text: str) -> list[str]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp.encode(text, out_type=str)
        # Without the dummy prefix SentencePiece drops a leading '▁'; encoding behind the unk token's
        # pieces keeps it, and those pieces are then cut off.
        pieces = self._sp.encode(self._unk_token + text, out_type=str)
        return pieces[self._unk_token_length:] if len(pieces) >= self._unk_token_length else pieces

    # ---- decoding ------------------------------------------------------------------------------------

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        tokens = [self.id_to_token(i) for i in ids if not (skip_special_tokens and int(i) in self._special_ids)]
        spans: list[str] = []
        pending: list[str] = []
        for token in tokens:
            if skip_special_tokens and token in self._special_tokens:
                continue
            if token in self._spaced_tokens:
                if pending:
                    span = self._pieces_to_string(pending)
                    if span:
                        spans.append(span)
                    pending = []
                spans.append(token)
            else:
                pending.append(token)
        if pending:
            spans.append(self._pieces_to_string(pending))
        text = " ".join(spans)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def decode_continuation(self, ids: Iterable[int], prompt_ids: Sequence[int] = (),
                            skip_special_tokens: bool = True) -> str:
        """The text of `ids` generated after `prompt_ids` as vLLM 0.2.6 hands it back (`outputs[0].text`),
        which the reference Self-RAG scripts read. vLLM detokenizes one token at a time with the fast
        tokenizer's decoder over a window of the last few tokens (prompt tokens at first), keeping the
        window's text past what it had already emitted. So the first generated word keeps its leading space
        (" Paris is ..."), added and special tokens sit against their neighbours with no space put between
        them ("[Irrelevant] I know.[Utility:1]</s>"), and text ending in U+FFFD (a character whose bytes
        have not all arrived) waits for the next token. skip_special_tokens leaves the special tokens out
        (`</s>` and the Self-RAG tokens among them), as vLLM's default does."""
        return IncrementalDetokenizer(self, list(prompt_ids), skip_special_tokens).add_all(ids)

    def _pieces_to_string(self, tokens: list[str]) -> str:
        """LlamaTokenizer.convert_tokens_to_string: SentencePiece decodes the runs between special tokens, each
        run losing one leading '▁' (and, with the dummy prefix, SentencePiece drops another)."""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens[0] = tokens[0][1:]
        out = ""
        run: list[str] = []
        prev_is_special = False
        for i, token in enumerate(tokens):
            if token in self._special_tokens:
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self._sp.decode(run) + token
                prev_is_special = True
                run = []
            else:
                if prev_is_special and i == 1 and self.add_prefix_space and not token.startswith(SPIECE_UNDERLINE):
                    out += " "
                run.append(token)
                prev_is_special = False
        return out + self._sp.decode(run)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pieces={self._num_pieces}, "
                f"added={len(self.added_tokens)}, legacy={self.legacy})")


# ---- file parsing --------------------------------------------------------------------------------------


def _load_sp(proto: bytes, source: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"'{source}' is not a valid SentencePiece model: {e}") from e
    return sp


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def _read_json(file: Path) -> dict | None:
    if not file.is_file():
        return None
    try:
        obj = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"'{file}' is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise TokenizerError(f"'{file}' does not hold a JSON object")
    return obj


def _content(value: object, file: Path, key: str) -> str | None:
    """A special token as transformers saves it: a string, or a dict with its `content`."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"'{file}': '{key}' must be a string or an object with a 'content' string, "
                         f"not {value!r}")


def _list(value: object, file: Path) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise TokenizerError(f"'{file}': 'additional_special_tokens' must be a list, not {value!r}")
    return value


def _token_id(value: object, file: Path, what: str) -> int:
    try:
        i = int(value) if isinstance(value, str) else value
    except ValueError:
        i = None
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
        raise TokenizerError(f"'{file}': {what} has an invalid id {value!r} (expected an integer >= 0)")
    return i


def _parse_added_tokens_decoder(decoder: object, file: Path) -> list[AddedToken]:
    if not isinstance(decoder, dict):
        raise TokenizerError(f"'{file}': 'added_tokens_decoder' must be an object mapping ids to tokens")
    out, seen = [], {}
    for key, entry in decoder.items():
        i = _token_id(key, file, "an 'added_tokens_decoder' entry")
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"]:
            raise TokenizerError(f"'{file}': 'added_tokens_decoder' entry {key} needs a non-empty 'content'")
        if i in seen:
            raise TokenizerError(f"'{file}': 'added_tokens_decoder' gives id {i} twice "
                                 f"({seen[i]!r} and {entry['content']!r})")
        seen[i] = entry["content"]
        out.append(AddedToken(entry["content"], i, lstrip=bool(entry.get("lstrip", False)),
                              rstrip=bool(entry.get("rstrip", False)),
                              single_word=bool(entry.get("single_word", False))))
    return out


def _parse_added_tokens_json(obj: dict | None, file: Path) -> list[tuple[str, int]]:
    if obj is None:
        return []
    out, seen = [], {}
    for content, value in obj.items():
        i = _token_id(value, file, f"added token {content!r}")
        if not content:
            raise TokenizerError(f"'{file}': an added token is the empty string")
        if i in seen:
            raise TokenizerError(f"'{file}': id {i} is given to two added tokens, {seen[i]!r} and {content!r}")
        seen[i] = content
        out.append((content, i))
    return out


def _check_agrees(added_json: dict, added: list[AddedToken], added_file: Path, config_file: Path) -> None:
    by_id = {t.id: t.content for t in added}
    for content, i in _parse_added_tokens_json(added_json, added_file):
        if by_id.get(i) != content:
            raise TokenizerError(f"'{added_file}' gives {content!r} id {i}, but 'added_tokens_decoder' in "
                                 f"'{config_file}' has {by_id.get(i)!r} there")


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: spaces before punctuation and English contractions removed."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
