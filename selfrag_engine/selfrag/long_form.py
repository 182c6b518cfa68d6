"""Long-form Self-RAG: the answer grows segment by segment in a tree searched with a beam, every node
decoding off its ancestors' cached KV blocks.

Paper flavour (`compat="paper"`, the default):
- The prompt is prefilled once. Its first position decides retrieval (modes and gate as in the short form).
  Not retrieving, the prompt continues after `[No Retrieval]` as a first segment (depth 0) that may still ask
  for evidence later.
- A segment ends where the model writes a retrieval-group token or `<paragraph>`, or ends the answer. At a
  retrieval-group token the threshold decides, on (p(Ret) + p(Continue)) / (p(Ret) + p(NoRet)) read at that
  position (threshold None: only `[Retrieval]` retrieves; `<paragraph>` always does): retrieving, the
  segment ends and the node expands; otherwise the segment goes on after that token (a new request forked
  off the node's cache). A segment gets max_new_tokens in all.
- Expanding a node forks K children off its cache, one per passage ("[Retrieval]<paragraph>...</paragraph>"
  replaces the token that ended the segment). All children of one depth, over every question of the batch,
  decode together. A child is scored as a short-form branch (relevance at its first position, grounding and
  utility at their first tokens, the optional sequence score) and its path score is the product of the
  scores along its path. Each depth keeps the best beam_width nodes among the new children and the beam's
  nodes that ended; up to max_depth depths of children. The best node of the last beam gives the answer:
  its path's segments joined with a space; each segment cites the passage it was written from.
- A passage that does not fit in the model's context after the prompt is an error; deeper in the tree, a
  node whose passages no longer fit ends there (its text is kept).
- retrieval="static" reads the same passages (given, or retrieved for the question once) at every node;
  retrieval="per_segment" asks the retriever, at each expansion, for question + " " + the node's segment.

Released flavour (`compat="released"`, or "official"): what run_long_form_static.py does, item by item (see
`ScriptQuirks` for the ones that can be switched off one at a time):
- passages are fixed before decoding (given, or retrieved for the question before anything is decoded);
- the scores follow ScoringConfig.released(form="long"): top-32000 reads, a missing relevance token counted
  as -100 raw, utility read off the grounding ids (so 0), use_seqscore ignored, w_use 0.5;
- the text the script tests is vLLM's, with special tokens stripped: the adaptive gate looks for
  "[Retrieval]" in a 25-token draft and never finds it (no retrieval), and a child never contains
  "[Retrieval]", so the tree stops at depth 1 (the best of K full generations);
- inside a child, each `[No Retrieval]` is rewritten to `[Retrieval]` when the segment gate above exceeds the
  threshold (only reachable with the text unstripped);
- a child's stored prompt is its parent's prompt plus the previous sibling's text (for siblings 2..K), and
  the next depth decodes from that prompt plus the child's text, re-encoded, without the passage;
- depths 1..max_depth-1 are expanded; the answer is the best node of the deepest non-empty depth; a
  no-retrieval answer is cut at its first blank line; a passage that does not fit is an error at any depth.
Forking and batching stay: only what the script observably computes is reproduced.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from selfrag_engine.engine.client import EngineClient
from selfrag_engine.engine.output import RequestOutput
from selfrag_engine.engine.sampling_params import SamplingParams
from selfrag_engine.errors import RequestError
from selfrag_engine.retrieval.passages import Passage
from selfrag_engine.selfrag.critique import (
    Critique,
    Decoded,
    Reader,
    critique,
    top_k_for,
)
from selfrag_engine.selfrag.decisions import (
    check_mode,
    decide_retrieval,
    gate_value,
    passage_suffixes,
    unfit_passage,
)
from selfrag_engine.selfrag.owned import Owned
from selfrag_engine.selfrag.prompts import format_prompt, postprocess
from selfrag_engine.selfrag.scoring import (
    ScoringConfig,
    normalize_compat,
    segment_gate,
)

RETRIEVALS = ("static", "per_segment")
# The released script decodes this many tokens to look for "[Retrieval]" before deciding.
RELEASED_GATE_TOKENS = 25


@dataclass(frozen=True)
class ScriptQuirks:
    """Behaviours of the released long-form script that compat="released" reproduces; each can be switched
    off alone, to see what it changes."""
    strip_special_tokens: bool = True   # string tests see vLLM's text, special tokens stripped
    sibling_carry_over: bool = True     # siblings 2..K store the previous sibling's text in their prompt
    rewrite_no_retrieval: bool = True   # [No Retrieval] -> [Retrieval] where the segment gate exceeds delta


@dataclass
class Segment:
    text: str                      # post-processed text of the segment
    passage: Passage | None        # the passage it was written from (None: no retrieval)
    depth: int
    relevance: float | None        # the critique, for segments written from a passage
    grounding: float | None
    utility: float | None
    final: float | None            # this segment's own score
    score: float | None            # product of the scores along the path down to it
    token_ids: list[int]


@dataclass
class LongAnswer:
    question: str
    answer: str
    segments: list[Segment]
    citations: list[Passage | None]  # per segment, its passage
    score: float | None              # the chosen path's score (None: no segment was scored)
    retrieved: bool                  # whether the answer used passages
    num_generated_tokens: int
    seconds: float
    trace: dict[str, Any]


@dataclass
class _Node:
    id: int
    parent: "_Node | None"
    depth: int
    passage: Passage | None = None
    decoded: Decoded | None = None
    crit: Critique | None = None
    score: float | None = None
    text: str = ""
    ended: str = "open"            # "retrieval", "stop", "length", "context"
    request: int | None = None     # paper: the request holding this node's cache (last token: the one that ended it)
    prompt: str | None = None      # released: the stored prompt
    pred: str | None = None        # released: the child's text after the rewrite
    decisions: list[dict[str, Any]] = field(default_factory=list)
    expanded: bool = False

    def path(self) -> list["_Node"]:
        nodes, node = [], self
        while node is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


@dataclass
class _Tree:
    index: int
    question: str
    prompt_text: str
    prompt: list[int]
    docs: list[Passage] | None
    head: int | None = None
    gate: float | None = None
    nodes: list[_Node] = field(default_factory=list)
    beam: list[_Node] = field(default_factory=list)
    levels: list[list[_Node]] = field(default_factory=list)
    tokens: int = 0
    queries: list[str] = field(default_factory=list)
    no_retrieval: str | None = None  # released: the answer when the tree is never built
    streamed: int = 0  # segments of the answer already handed to on_segment

    def node(self, parent: _Node | None, depth: int, **kw) -> _Node:
        n = _Node(len(self.nodes), parent, depth, **kw)
        self.nodes.append(n)
        return n


def check_released_tree(max_depth: int | None, mode: str) -> None:
    """The long form's options the released flavour cannot run (RequestError; max_depth None: the runner's
    default): checked by the runner, and by a request's options before it is queued, so that a server refuses
    them before a stream starts."""
    if max_depth is not None and max_depth < 2:
        raise RequestError(f"compat='released' expands depths 1..max_depth-1 and needs max_depth >= 2, "
                           f"got {max_depth}")
    if mode == "never":
        raise RequestError("compat='released' with mode='never': the reference long-form script fails "
                           "there (it returns a prediction tree it never made); use the paper flavour")


class LongFormSelfRAG:
    """Long-form Self-RAG over an engine and an optional retriever (anything with `search(query, k) ->
    list[Passage]`); passages may also be given per question."""

    def __init__(self, engine: EngineClient, retriever=None, scoring: ScoringConfig | None = None, ndocs: int = 5,
                 max_new_tokens: int = 300, beam_width: int = 2, max_depth: int = 7, mode: str = "adaptive",
                 retrieval: str = "static", compat: str = "paper", quirks: ScriptQuirks | None = None):
        if engine.reflection_groups is None:
            raise RequestError("the engine's tokenizer has no Self-RAG reflection tokens ([Retrieval], "
                               "[Relevant], [Utility:5], ...): load a Self-RAG checkpoint")
        check_mode(mode)
        if retrieval not in RETRIEVALS:
            raise RequestError(f"retrieval must be one of {RETRIEVALS}, got {retrieval!r}")
        for name, value in (("ndocs", ndocs), ("max_new_tokens", max_new_tokens), ("beam_width", beam_width),
                            ("max_depth", max_depth)):
            if not isinstance(value, int) or value < 1:
                raise RequestError(f"{name} must be a positive integer, got {value!r}")
        self.compat = normalize_compat(compat)
        if self.compat == "released":
            if retrieval != "static":
                raise RequestError("compat='released' fixes the passages before decoding (retrieval='static'); "
                                   "retrieval='per_segment' is the paper flavour's")
            check_released_tree(max_depth, mode)
        elif quirks is not None:
            raise RequestError("quirks switch behaviours of compat='released' only")
        if retrieval == "per_segment" and retriever is None:
            raise RequestError("retrieval='per_segment' needs a retriever")
        self.engine = engine
        self.retriever = retriever
        self.scoring = scoring or (ScoringConfig.paper() if self.compat == "paper"
                                   else ScoringConfig.released(form="long"))
        self.ndocs = ndocs
        self.max_new_tokens = max_new_tokens
        self.beam_width = beam_width
        self.max_depth = max_depth
        self.mode = mode
        self.retrieval = retrieval
        self.quirks = quirks or ScriptQuirks()
        ref = engine.tokenizer.reflection_token_ids()
        self.ids = ref.groups()
        self.ret, self.noret, self.cont = self.ids["retrieval"]
        self.paragraph_open = ref.paragraph_open
        self.control_ids = {t for g in self.ids.values() for t in g} | {ref.paragraph_open, ref.paragraph_close}

    # ---- shared --------------------------------------------------------------------------------------

    def _params(self, max_tokens: int, stops: bool = False) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, reflection=True, detokenize=False,
                              logprobs=top_k_for(self.scoring, self.engine.config.vocab_size),
                              stop_token_ids=[self.ret, self.noret, self.cont, self.paragraph_open] if stops else [])

    def _text(self, token_ids: Sequence[int]) -> str:
        """Post-processed text: reflection tokens, paragraph markers and EOS removed."""
        eos = self.engine.tokenizer.eos_id
        kept = [t for t in token_ids if t not in self.control_ids and t != eos]
        return postprocess(self.engine.tokenizer.decode(kept, skip_special_tokens=True))

    def _given_docs(self, tree: _Tree, given: Sequence[Passage] | None) -> list[Passage] | None:
        if given is not None:
            return list(given)[:self.ndocs]
        if self.retriever is None:
            return None
        tree.queries.append(tree.question)
        return list(self.retriever.search(tree.question, self.ndocs))[:self.ndocs]

    def _need_docs(self, tree: _Tree, docs: list[Passage] | None) -> list[Passage]:
        if not docs:
            raise RequestError(f"retrieval was chosen for question {tree.index} but neither passages nor a "
                               f"retriever were given (pass passages, a retriever, or mode='never')")
        return docs

    # ---- API ------------------------------------------------------------------------------------------

    def answer(self, question: str, passages: Sequence[Passage] | None = None, *,
               input: str | None = None, on_segment: Callable[[Segment], None] | None = None) -> LongAnswer:
        """on_segment, if given, receives the answer's segments in order as soon as each is certain (see
        answer_batch)."""
        stream = None if on_segment is None else (lambda _, segment: on_segment(segment))
        return self.answer_batch([question], [passages] if passages is not None else None, input=input,
                                 on_segment=stream)[0]

    def answer_batch(self, questions: Sequence[str], passages: Sequence[Sequence[Passage] | None] | None = None,
                     *, input: str | None = None,
                     on_segment: Callable[[int, Segment], None] | None = None) -> list[LongAnswer]:
        """Answers several questions together: each depth of every question's tree decodes in one batch.

        on_segment(question index, segment), if given, streams each answer's segments in order: a segment is
        handed over once every node of its tree's beam descends from it, so that no later choice can drop
        it, and the rest when the answer is chosen. The segments handed over are the answer's `segments`."""
        if passages is not None and len(passages) != len(questions):
            raise RequestError(f"{len(questions)} questions but {len(passages)} passage lists")
        tok = self.engine.tokenizer
        start = time.perf_counter()
        trees = []
        for i, q in enumerate(questions):
            text = format_prompt(q, input)
            trees.append(_Tree(i, q, text, tok.encode(text), None))
        given = list(passages) if passages is not None else [None] * len(trees)
        if self.compat == "released":
            # Passages are fixed before anything is decoded.
            for tree, g in zip(trees, given):
                tree.docs = self._given_docs(tree, g)
            with Owned(self.engine) as owned:
                self._released(owned, trees, on_segment)
        else:
            with Owned(self.engine) as owned:
                self._paper(owned, trees, given, on_segment)
        answers = [self._answer(tree, start) for tree in trees]
        if on_segment is not None:
            for tree, ans in zip(trees, answers):
                for segment in ans.segments[tree.streamed:]:
                    on_segment(tree.index, segment)
        return answers

    def _stream_settled(self, tree: _Tree, nodes: Sequence[_Node],
                        on_segment: Callable[[int, Segment], None] | None) -> None:
        """Hands over the segments of the nodes every one of `nodes` (a beam) descends from: the answer's
        path runs through them whichever node wins."""
        if on_segment is None or not nodes:
            return
        common: list[_Node] = []
        for column in zip(*(n.path() for n in nodes)):
            if any(n is not column[0] for n in column):
                break
            common.append(column[0])
        settled = self._answer_path(common)
        for n in settled[tree.streamed:]:
            on_segment(tree.index, self._segment(n))
        tree.streamed = max(tree.streamed, len(settled))

    def _answer_path(self, path: list[_Node]) -> list[_Node]:
        """The nodes of a root-first path that give the answer's segments (not a root that only retrieved)."""
        if self.compat == "released":
            return path[1:]
        return [n for n in path if not (n.parent is None and n.ended == "retrieval")]

    # ---- paper flavour --------------------------------------------------------------------------------

    def _paper(self, owned: Owned, trees: list[_Tree], given: list[Sequence[Passage] | None],
               on_segment: Callable[[int, Segment], None] | None) -> None:
        engine = self.engine
        first = SamplingParams(max_tokens=1, temperature=0.0, reflection=True, detokenize=False)
        for tree in trees:
            tree.head = owned.add(tree.prompt, first, keep_cache=True)
        heads = owned.run([t.head for t in trees])
        segments: dict[int, _Node] = {}
        for tree, head in zip(trees, heads):
            if self._root_retrieves(tree, head):
                root = tree.node(None, 0, ended="retrieval", request=tree.head,
                                 decoded=Decoded.from_output(head))
                tree.beam = [root]
            else:
                root = tree.node(None, 0)
                kid = owned.fork(tree.head, [[self.noret]], self._params(self.max_new_tokens, self.mode != "never"),
                                 prefix_len=len(tree.prompt), keep_cache=True)[0]
                owned.drop(tree.head)
                segments[kid] = root
                tree.beam = [root]
        self._drive(owned, segments)
        for tree in trees:
            for n in tree.beam:
                self._settle(owned, n)
            self._stream_settled(tree, tree.beam, on_segment)
        for depth in range(1, self.max_depth + 1):
            children: dict[int, _Node] = {}
            expanded: dict[int, list[_Node]] = {}
            for tree, g in zip(trees, given):
                kids = self._expand(owned, tree, g, depth, children)
                if kids is not None:
                    expanded[tree.index] = kids
            if not expanded:
                break
            self._drive(owned, children)
            reader = Reader(self.scoring, engine.config.vocab_size, engine.score)
            for tree in trees:
                if tree.index not in expanded:
                    continue
                kids = expanded[tree.index]
                for kid in kids:
                    self._settle(owned, kid)
                    kid.crit = critique(kid.decoded, reader, self.ids)
                    kid.score = kid.crit.final if kid.parent.score is None else kid.parent.score * kid.crit.final
                carried = [n for n in tree.beam if not n.expanded]
                candidates = kids + carried
                ranked = sorted(candidates, key=lambda n: float("-inf") if n.score is None else n.score, reverse=True)
                tree.beam = ranked[:self.beam_width]
                for n in ranked[self.beam_width:]:
                    self._close(owned, n)
                self._stream_settled(tree, tree.beam, on_segment)
        for tree in trees:
            for n in tree.beam:
                self._close(owned, n)

    def _root_retrieves(self, tree: _Tree, head: RequestOutput) -> bool:
        retrieve, tree.gate = decide_retrieval(Decoded.from_output(head), self.mode, self.scoring, self.ret)
        return retrieve

    def _expand(self, owned: Owned, tree: _Tree, given: Sequence[Passage] | None, depth: int,
                children: dict[int, _Node]) -> list[_Node] | None:
        """Forks the children of the beam's nodes that asked for retrieval; None when none did."""
        kids: list[_Node] = []
        for node in tree.beam:
            if node.ended != "retrieval" or node.request is None:
                continue
            docs = self._docs_for(tree, node, given)
            suffixes = passage_suffixes(self.engine.tokenizer, docs)
            prefix_len = len(node.decoded.context_ids) + len(node.decoded.token_ids) - 1
            unfit = unfit_passage(prefix_len, suffixes, docs, self.engine.max_model_len)
            if unfit is not None:
                if node.parent is None:
                    raise unfit
                node.ended = "context"  # deeper in the tree: the node ends here, its text kept
                self._close(owned, node)
                continue
            rids = owned.fork(node.request, suffixes, self._params(self.max_new_tokens, stops=True),
                              prefix_len=prefix_len, keep_cache=True)
            owned.drop(node.request)
            node.request = None
            node.expanded = True
            for doc, rid in zip(docs, rids):
                kid = tree.node(node, depth, passage=doc)
                children[rid] = kid
                kids.append(kid)
        return kids or None

    def _docs_for(self, tree: _Tree, node: _Node, given: Sequence[Passage] | None) -> list[Passage]:
        # Passages given with the question serve the root's expansion in both modes of retrieval.
        if self.retrieval == "per_segment" and not (node.parent is None and given is not None):
            query = f"{tree.question} {node.text}" if node.text else tree.question
            tree.queries.append(query)
            return self._need_docs(tree, list(self.retriever.search(query, self.ndocs))[:self.ndocs])
        if tree.docs is None:
            tree.docs = self._given_docs(tree, given)
        return self._need_docs(tree, tree.docs)

    def _drive(self, owned: Owned, pending: dict[int, _Node]) -> None:
        """Decodes the segments of `pending` (request -> node) together, stepping the engine; a segment that
        stops at a retrieval token it does not retrieve on continues in a request forked off its cache."""
        pending = dict(pending)
        while pending:
            for rid in self.engine.run_until_any(pending):
                node = pending.pop(rid)
                new = self._segment_finished(owned, rid, node)
                if new is not None:
                    pending[new] = node

    def _segment_finished(self, owned: Owned, rid: int, node: _Node) -> int | None:
        out = self.engine.output(rid)
        if node.decoded is None:
            node.decoded = Decoded.from_output(out)
        else:
            node.decoded.extend(out)
        d = node.decoded
        node.request = rid
        token = d.token_ids[-1]
        if out.finish_reason != "stop" or out.stop_reason is None:
            node.ended = "length" if out.finish_reason == "length" else "stop"
            return None
        step = len(d.token_ids) - 1
        retrieve = self._segment_retrieves(d, step, token)
        node.decisions.append({"step": step, "token": self.engine.tokenizer.id_to_token(token),
                               "retrieve": retrieve})
        if retrieve:
            node.ended = "retrieval"
            return None
        total = len(d.context_ids) + len(d.token_ids)
        left = self.max_new_tokens - len(d.token_ids)
        if left < 1 or total >= self.engine.max_model_len:
            node.ended = "length"
            return None
        new = owned.fork(rid, [[token]], self._params(left, stops=True), prefix_len=total - 1, keep_cache=True)[0]
        owned.drop(rid)
        node.request = None
        return new

    def _segment_retrieves(self, d: Decoded, step: int, token: int) -> bool:
        if token == self.paragraph_open:
            return True
        if self.scoring.threshold is None:
            return token == self.ret
        p = Reader(ScoringConfig()).group(d, step, "retrieval")
        return segment_gate(p["[Retrieval]"], p["[No Retrieval]"], p["[Continue to Use Evidence]"]) > \
            self.scoring.threshold

    def _settle(self, owned: Owned, node: _Node) -> None:
        """After a node's segment is decoded: its text, and its cache kept only if it may expand."""
        if node.decoded is not None:
            tokens = node.decoded.token_ids
            if node.parent is None and node.ended == "retrieval":
                tokens = []  # the root's only token is the gate's
            elif node.ended == "retrieval":
                tokens = tokens[:-1]
            node.text = self._text(tokens)
        if node.ended != "retrieval" or node.depth >= self.max_depth:
            self._close(owned, node)

    def _close(self, owned: Owned, node: _Node) -> None:
        if node.request is not None:
            owned.drop(node.request)
            node.request = None

    # ---- released flavour -----------------------------------------------------------------------------

    def _pred(self, token_ids: Sequence[int], context_ids: Sequence[int]) -> str:
        """The text the script's string tests see and re-encodes into the next depth's prompt: vLLM's (the
        first word's leading space kept), special tokens stripped unless switched off, and then `</s>` kept
        as vLLM writes it."""
        return self.engine.tokenizer.decode_continuation(token_ids, context_ids,
                                                         skip_special_tokens=self.quirks.strip_special_tokens)

    def _released(self, owned: Owned, trees: list[_Tree], on_segment: Callable[[int, Segment], None] | None
                  ) -> None:
        first = SamplingParams(max_tokens=1, temperature=0.0, reflection=True, detokenize=False)
        for tree in trees:
            tree.head = owned.add(tree.prompt, first, keep_cache=True)
        heads = dict(zip((t.index for t in trees), owned.run([t.head for t in trees])))
        building = []
        if self.mode == "adaptive":
            self._released_gates(owned, trees, heads)
        plain = []
        for tree in trees:
            retrieve = self.mode == "always" or (self.mode == "adaptive" and tree.gate is not None
                                                 and self.scoring.threshold is not None
                                                 and tree.gate > self.scoring.threshold)
            if retrieve:
                building.append(tree)
            else:
                kid = owned.fork(tree.head, [[self.noret]], self._params(self.max_new_tokens),
                                 prefix_len=len(tree.prompt))[0]
                plain.append((tree, kid))
        for (tree, kid), out in zip(plain, owned.run([k for _, k in plain])):
            tree.tokens += len(out.token_ids)
            tree.no_retrieval = self._pred(out.token_ids, out.prompt_token_ids).split("\n\n")[0]
            owned.drop(kid)
            owned.drop(tree.head)
        for tree in building:
            root = tree.node(None, 0, prompt=tree.prompt_text, pred="[Retrieval]", text="", ended="retrieval")
            tree.levels = [[root]]
            tree.docs = self._need_docs(tree, tree.docs)
        for depth in range(1, self.max_depth):
            active = [t for t in building if t.levels[-1] and any("[Retrieval]" in n.pred for n in t.levels[-1])]
            if not active:
                break
            self._released_depth(owned, active, depth)
            for tree in active:
                self._stream_settled(tree, tree.levels[-1], on_segment)
        for tree in building:
            if tree.head is not None:
                owned.drop(tree.head)

    def _released_gates(self, owned: Owned, trees: list[_Tree], heads: dict) -> None:
        """The script's adaptive gate: a 25-token draft; retrieve only if its text holds "[Retrieval]" and the
        probability ratio at its first position exceeds the threshold."""
        eos = self.engine.tokenizer.eos_id
        drafts = []
        for tree in trees:
            head = heads[tree.index]
            if head.token_ids[-1] != eos and RELEASED_GATE_TOKENS > 1:
                kid = owned.fork(tree.head, [head.token_ids], self._params(RELEASED_GATE_TOKENS - 1),
                                 prefix_len=len(tree.prompt))[0]
                drafts.append((tree, kid))
        tails = {tree.index: out for (tree, _), out in zip(drafts, owned.run([k for _, k in drafts]))}
        for tree, kid in drafts:
            owned.drop(kid)
        for tree in trees:
            head = heads[tree.index]
            tokens = list(head.token_ids) + (list(tails[tree.index].token_ids) if tree.index in tails else [])
            tree.tokens += len(tokens)
            text = self._pred(tokens, tree.prompt).split("\n\n")[0]
            if "[Retrieval]" not in text or self.scoring.threshold is None:
                continue
            tree.gate = gate_value(Decoded.from_output(head), "prob")

    def _released_depth(self, owned: Owned, trees: list[_Tree], depth: int) -> None:
        """One depth of the script's tree: every expanding node's K children decoded in one batch (a parent
        request per node holds its re-encoded prompt, the children fork off it)."""
        tok = self.engine.tokenizer
        first = SamplingParams(max_tokens=1, temperature=0.0, reflection=False, detokenize=False)
        expanding: list[tuple[_Tree, _Node, list[int], int]] = []
        for tree in trees:
            for node in tree.levels[-1]:
                if "[Retrieval]" not in node.pred:
                    continue
                if node.parent is None:
                    ids, parent = tree.prompt, tree.head
                else:
                    ids = tok.encode(node.prompt + node.text)
                    parent = owned.add(ids, first, keep_cache=True)
                expanding.append((tree, node, ids, parent))
        fresh = [p for tree, node, _, p in expanding if node.parent is not None]
        owned.run(fresh)
        groups: list[tuple[_Tree, _Node, list[int]]] = []
        for tree, node, ids, parent in expanding:
            suffixes = passage_suffixes(tok, tree.docs)
            unfit = unfit_passage(len(ids), suffixes, tree.docs, self.engine.max_model_len)
            if unfit is not None:
                raise unfit
            rids = owned.fork(parent, suffixes, self._params(self.max_new_tokens), prefix_len=len(ids))
            groups.append((tree, node, rids))
        for _, node, _, parent in expanding:
            if node.parent is not None:
                owned.drop(parent)
        outs = owned.run([r for _, _, rids in groups for r in rids])
        reader = Reader(self.scoring, self.engine.config.vocab_size, self.engine.score)
        at = 0
        level: dict[int, list[_Node]] = {}
        for tree, node, rids in groups:
            prev = node.text
            for doc, rid in zip(tree.docs, rids):
                out = outs[at]
                at += 1
                d = Decoded.from_output(out)
                owned.drop(rid)
                tree.tokens += len(d.token_ids)
                kid = tree.node(node, depth, passage=doc, decoded=d)
                kid.crit = critique(d, reader, self.ids)
                kid.score = kid.crit.final if node.score is None else kid.crit.final * node.score
                kid.pred = self._rewrite(d, self._pred(d.token_ids, d.context_ids), kid)
                kid.prompt = node.prompt + prev
                kid.text = kid.pred[:kid.pred.index("[Retrieval]")] if "[Retrieval]" in kid.pred else kid.pred
                kid.ended = "retrieval" if "[Retrieval]" in kid.pred else (d.finish_reason or "stop")
                if self.quirks.sibling_carry_over:
                    prev = kid.text
                level.setdefault(tree.index, []).append(kid)
        for tree in trees:
            kids = level.get(tree.index, [])
            tree.levels.append(sorted(kids, key=lambda n: n.score, reverse=True)[:self.beam_width])

    def _rewrite(self, d: Decoded, pred: str, node: _Node) -> str:
        """The script's rewrite of each "[No Retrieval]" in a child's text (only present when unstripped)."""
        if not self.quirks.rewrite_no_retrieval or "[No Retrieval]" not in pred:
            return pred
        if self.scoring.threshold is None:
            raise RequestError("compat='released' needs a threshold to rewrite [No Retrieval] inside a segment "
                               "(the reference script compares with None there and fails)")
        reader = Reader(self.scoring, self.engine.config.vocab_size, self.engine.score)
        steps = [s for s, t in enumerate(d.token_ids) if t == self.noret]
        remap = []
        for step in steps:
            p = reader.group(d, step, "retrieval")
            value = segment_gate(p["[Retrieval]"], p["[No Retrieval]"], p["[Continue to Use Evidence]"])
            remap.append(value > self.scoring.threshold)
            node.decisions.append({"step": step, "token": "[No Retrieval]", "value": value, "retrieve": remap[-1]})
        pieces = pred.split("[No Retrieval]")
        # As the script: each piece gets the token back (rewritten where the gate says so), the last one too.
        return "".join(piece + ("[Retrieval]" if i < len(remap) and remap[i] else "[No Retrieval]")
                       for i, piece in enumerate(pieces))

    # ---- answers ----------------------------------------------------------------------------------------

    def _answer(self, tree: _Tree, start: float) -> LongAnswer:
        elapsed = time.perf_counter() - start
        if self.compat == "released":
            return self._released_answer(tree, elapsed)
        for n in tree.nodes:
            if n.decoded is not None and not (n.parent is None and n.ended == "retrieval"):
                tree.tokens += len(n.decoded.token_ids)
        best = max(tree.beam, key=lambda n: float("-inf") if n.score is None else n.score)
        segments = [self._segment(n) for n in self._answer_path(best.path())]
        answer = postprocess(" ".join(s.text for s in segments if s.text), long_form=True)
        return LongAnswer(tree.question, answer, segments, [s.passage for s in segments], best.score,
                          any(s.passage is not None for s in segments), tree.tokens, elapsed,
                          self._trace(tree, best))

    def _released_answer(self, tree: _Tree, elapsed: float) -> LongAnswer:
        """The script's final prediction as its tree search returns it: without retrieval, vLLM's text up to the
        first blank line; with it, the path's texts joined with spaces, the root's empty one first, so the
        answer starts with the join's space and vLLM's own (`"  Paris is ..."`). Segments are post-processed."""
        if tree.no_retrieval is not None:
            seg = Segment(postprocess(tree.no_retrieval), None, 0, None, None, None, None, None, [])
            return LongAnswer(tree.question, tree.no_retrieval, [seg], [None], None,
                              False, tree.tokens, elapsed, self._trace(tree, None))
        deepest = [level for level in tree.levels[1:] if level][-1]
        best = deepest[0]
        path = best.path()
        joined = " ".join(n.text for n in path)
        segments = [self._segment(n) for n in self._answer_path(path)]
        return LongAnswer(tree.question, joined, segments,
                          [s.passage for s in segments], best.score, True, tree.tokens, elapsed,
                          self._trace(tree, best))

    def _segment(self, n: _Node) -> Segment:
        c = n.crit
        text = postprocess(n.text) if self.compat == "released" else n.text
        return Segment(text, n.passage, n.depth, c.relevance if c else None, c.grounding if c else None,
                       c.utility if c else None, c.final if c else None, n.score,
                       list(n.decoded.token_ids) if n.decoded is not None else [])

    def _trace(self, tree: _Tree, best: _Node | None) -> dict[str, Any]:
        chosen = {n.id for n in best.path()} if best is not None else set()
        kept = {n.id for n in tree.beam} | {n.id for level in tree.levels for n in level}
        nodes = []
        for n in tree.nodes:
            c = n.crit
            entry: dict[str, Any] = {
                "id": n.id, "parent": None if n.parent is None else n.parent.id, "depth": n.depth,
                "title": n.passage.title if n.passage else None, "passage_id": n.passage.id if n.passage else None,
                "text": n.text, "ended": n.ended, "score": n.score, "kept": n.id in kept, "chosen": n.id in chosen,
                "token_ids": list(n.decoded.token_ids) if n.decoded is not None else [],
                "decisions": n.decisions,
            }
            if c is not None:
                entry.update(relevance=c.relevance, grounding=c.grounding, utility=c.utility, seq_score=c.seq_score,
                             final=c.final, probs=c.probs)
            if self.compat == "released":
                entry.update(prompt=n.prompt, pred=n.pred)
            nodes.append(entry)
        return {"compat": self.compat, "mode": self.mode, "retrieval": self.retrieval, "gate": tree.gate,
                "queries": tree.queries, "nodes": nodes, "best": None if best is None else best.id,
                "no_retrieval": tree.no_retrieval}
