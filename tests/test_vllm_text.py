"""`Tokenizer.decode_continuation` gives the text vLLM 0.2.6 hands the reference scripts: checked against
vLLM's incremental detokenizer written out below as vLLM has it (`detokenize_incrementally`), running over
transformers' own pieces (the slow LlamaTokenizer) and transformers' own fast decoder (LlamaConverter's, run
by the tokenizers library), on random generated ids and on the strings docs/SELFRAG.md quotes."""
import random

import pytest
from transformers.convert_slow_tokenizer import LlamaConverter

from selfrag_engine.selfrag.prompts import format_prompt
from selfrag_engine.tokenizer import Tokenizer
from tests.helpers import slow_llama_tokenizer, tiny_checkpoint, tiny_model_dir


@pytest.fixture(scope="module")
def toks():
    path = tiny_checkpoint(seed=13)
    return Tokenizer.from_pretrained(path), slow_llama_tokenizer().from_pretrained(path, legacy=True)


def _vllm_text(hf, prompt_ids: list[int], ids: list[int], skip_special_tokens: bool) -> str:
    """vLLM 0.2.6's LLMEngine._decode_sequence over each generated token: detokenize_incrementally with a
    fast tokenizer (convert_tokens_to_string is the backend decoder's decode), its output concatenated."""
    decoder = LlamaConverter.decoder(None, "▁", True)
    special = set(hf.all_special_ids)
    all_ids = list(prompt_ids)
    tokens = None
    prefix_offset = read_offset = 0
    out = ""
    for new_token_id in ids:
        all_ids.append(new_token_id)
        if tokens is None:
            new_tokens = hf.convert_ids_to_tokens(all_ids, skip_special_tokens=skip_special_tokens)
            output_tokens = new_tokens
            prefix_offset = max(len(output_tokens) - 6, 0)
            if skip_special_tokens and new_token_id in special:
                read_offset = max(len(output_tokens), 0)
            else:
                read_offset = max(len(output_tokens) - 1, 0)
        else:
            new_tokens = hf.convert_ids_to_tokens([new_token_id], skip_special_tokens=skip_special_tokens)
            output_tokens = tokens + new_tokens
        prefix_text = decoder.decode(output_tokens[prefix_offset:read_offset])
        new_text = decoder.decode(output_tokens[prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out += new_text[len(prefix_text):]
            prefix_offset, read_offset = read_offset, len(output_tokens)
        tokens = output_tokens
    return out


def test_quoted_strings(toks):
    ours, _ = toks
    prompt = ours.encode(format_prompt("Where is Hirnbem Kakravu from?"))
    # What a model writes: text after an added token starts with '▁' (the legacy encoding).
    written = ours.encode("[Irrelevant]", add_bos=False) + ours.encode("I don't know.", add_bos=False) \
        + ours.encode("[Utility:1]</s>", add_bos=False)
    assert ours.decode_continuation(written, prompt, skip_special_tokens=False) == \
        "[Irrelevant] I don't know.[Utility:1]</s>"
    assert ours.decode_continuation(written, prompt) == " I don't know."
    answer = ours.encode("Hirnbem Kakravu is from Stindromor.", add_bos=False)
    assert ours.decode_continuation(answer, prompt) == " Hirnbem Kakravu is from Stindromor."
    assert ours.decode(answer) == "Hirnbem Kakravu is from Stindromor."  # the paper flavour's decode


@pytest.mark.parametrize("skip", [True, False])
def test_random_generations_match_vllm(toks, skip):
    ours, hf = toks
    rng = random.Random(1234)
    added = sorted(ours.added_tokens.values())
    byte_ids = [i for i in range(ours.num_pieces) if ours.id_to_token(i).startswith("<0x")]
    words = ["Paris", "is", "café", "naïve", "日本", "😀", "know.", "x\ny"]
    for trial in range(300):
        prompt = ours.encode(format_prompt(" ".join(rng.choices(words, k=rng.randint(1, 4)))))
        if trial % 3 == 0:
            prompt += ours.encode("[Retrieval]<paragraph>Title\ntext</paragraph>", add_bos=False)
        ids: list[int] = []
        for _ in range(rng.randint(1, 25)):
            r = rng.random()
            if r < 0.15:
                ids.append(rng.choice(added + [ours.eos_id]))
            elif r < 0.3:
                ids.append(rng.choice(byte_ids))  # broken and unfinished characters too
            elif r < 0.5:
                ids += ours.encode(rng.choice(words), add_bos=False)
            else:
                ids.append(rng.randrange(3, ours.num_pieces))
        assert ours.decode_continuation(ids, prompt, skip_special_tokens=skip) == \
            _vllm_text(hf, prompt, ids, skip), (prompt[-6:], ids)


# ---- the released flavour returns these strings ---------------------------------------------------------


@pytest.fixture(scope="module")
def steered():
    from tests.selfrag_fixtures import steered_engine
    return steered_engine()


def test_released_short_form_texts_are_vllms(steered):
    from selfrag_engine.selfrag.prompts import format_passage, postprocess
    from selfrag_engine.selfrag.short_form import SelfRAG
    from tests.selfrag_fixtures import passages, question

    tok = steered.tokenizer
    rng = random.Random(5)
    q, docs = question(rng), passages(rng, 3)
    prompt = tok.encode(format_prompt(q))
    common = dict(max_new_tokens=8, mode="always")
    released = SelfRAG(steered, compat="released", **common).answer(q, docs)
    paper = SelfRAG(steered, **common).answer(q, docs)
    control = set(tok.added_tokens.values()) | {tok.eos_id}
    for r, p, doc in zip(released.branches, paper.branches, docs):
        context = prompt + tok.encode(format_passage(doc.title, doc.text), add_bos=False)
        assert r.token_ids == p.token_ids
        assert r.text == _vllm_text(toks_hf(), context, r.token_ids, True)
        # The paper flavour keeps its post-processed text.
        assert p.text == postprocess(tok.decode([t for t in p.token_ids if t not in control], skip_special_tokens=True))
    assert released.answer == released.branches[released.best].text
    closed = SelfRAG(steered, compat="released", **common).answer(q, docs, closed_set=True)
    assert closed.answer == _answer_option(closed.branches[closed.best].text)


def toks_hf():
    return slow_llama_tokenizer().from_pretrained(tiny_checkpoint(seed=13), legacy=True)


def test_released_long_form_unstripped_texts_keep_eos(steered):
    from selfrag_engine import RequestError
    from selfrag_engine.selfrag.long_form import LongFormSelfRAG, ScriptQuirks
    from selfrag_engine.selfrag.prompts import format_passage
    from tests.selfrag_fixtures import passages, question

    tok = steered.tokenizer
    hf = toks_hf()
    rng = random.Random(6)
    qs = [question(rng) for _ in range(3)]
    docs = [passages(rng, 3) for _ in qs]
    # Without the [No Retrieval] rewrite the stored text is vLLM's up to the first [Retrieval].
    quirks = ScriptQuirks(strip_special_tokens=False, rewrite_no_retrieval=False)
    rag = LongFormSelfRAG(steered, compat="released", quirks=quirks,
                          ndocs=3, max_new_tokens=16, mode="always", max_depth=2)
    ended_with_eos = 0
    for a, q, ds in zip(rag.answer_batch(qs, docs), qs, docs):
        for kid in (n for n in a.trace["nodes"] if n["depth"] == 1):
            doc = next(d for d in ds if d.title == kid["title"])
            context = tok.encode(format_prompt(q)) + tok.encode(format_passage(doc.title, doc.text), add_bos=False)
            pred = _vllm_text(hf, context, kid["token_ids"], False)
            assert kid["text"] == (pred[:pred.index("[Retrieval]")] if "[Retrieval]" in pred else pred)
            if kid["token_ids"][-1] == tok.eos_id and "[Retrieval]" not in pred:
                ended_with_eos += 1
                assert kid["text"].endswith("</s>")
    assert ended_with_eos, "no child ended with </s>: the case the quirk is about did not occur"
    with pytest.raises(RequestError, match="mode='never'"):
        LongFormSelfRAG(steered, compat="released", mode="never")
    LongFormSelfRAG(steered, mode="never")  # the paper flavour serves it


# The short-form script's post-processing (`postprocess_answer_option_conditioned`), as the script writes it.
_CONTROL = ["[Fully supported]", "[Partially supported]", "[No support / Contradictory]", "[No Retrieval]",
            "[Retrieval]", "[Irrelevant]", "[Relevant]", "<paragraph>", "</paragraph>", "[Utility:1]", "[Utility:2]",
            "[Utility:3]", "[Utility:4]", "[Utility:5]"]


def _answer_option(answer: str) -> str:
    for token in _CONTROL:
        answer = answer.replace(token, "")
    return answer.replace("</s>", "").replace("\n", "").replace("<|endoftext|>", "")


def test_released_strings_are_the_scripts_on_every_path(steered):
    """No retrieval, closed sets and long-form finals: each answer string re-derived here as the reference
    functions build it, from vLLM's text (the detokenizer above, over transformers' tokenizer) of the tokens
    the engine generated, and the scores the engine reports."""
    from selfrag_engine import SamplingParams
    from selfrag_engine.selfrag.long_form import LongFormSelfRAG
    from selfrag_engine.selfrag.prompts import format_passage
    from selfrag_engine.selfrag.scoring import ScoringConfig
    from selfrag_engine.selfrag.short_form import SelfRAG
    from tests.selfrag_fixtures import passages, question

    tok, hf = steered.tokenizer, toks_hf()
    noret = tok.token_to_id("[No Retrieval]")
    rng = random.Random(8)
    qs = [question(rng) for _ in range(10)]
    docs = [passages(rng, 3) for _ in qs]
    prompts = [tok.encode(format_prompt(q)) for q in qs]

    def context(i: int, doc) -> list[int]:
        return prompts[i] + tok.encode(format_passage(doc.title, doc.text), add_bos=False)

    def continuation(i: int, n: int) -> str:
        """vLLM's text of the greedy answer after the prompt and "[No Retrieval]" (what the scripts generate)."""
        ctx = prompts[i] + [noret]
        ids = steered.generate([ctx], SamplingParams(max_tokens=n, temperature=0.0))[0].token_ids
        return _vllm_text(hf, ctx, ids, True)

    # Short form without retrieval: call_model_rerank_w_scores_batch post-processes the continuation.
    never = SelfRAG(steered, compat="released", max_new_tokens=10, mode="never").answer_batch(qs)
    assert [a.answer for a in never] == [_answer_option(continuation(i, 10)) for i in range(len(qs))]
    # Closed sets: final scores summed per post-processed branch text; the best sum's text.
    closed = SelfRAG(steered, compat="released", max_new_tokens=8, mode="always").answer_batch(
        qs, docs, closed_set=True)
    for i, a in enumerate(closed):
        totals: dict[str, float] = {}
        for b, doc in zip(a.branches, docs[i]):
            key = _answer_option(_vllm_text(hf, context(i, doc), b.token_ids, True))
            totals[key] = totals.get(key, 0.0) + b.final
        assert a.answer == sorted(totals.items(), key=lambda kv: kv[1], reverse=True)[0][0]
    # Long form: call_model_beam_batch joins the best path's texts, the root's empty one first.
    long = LongFormSelfRAG(steered, compat="released", ndocs=3, max_new_tokens=12, mode="always",
                           max_depth=3).answer_batch(qs[:6], docs[:6])
    for i, a in enumerate(long):
        kids = sorted((n for n in a.trace["nodes"] if n["depth"] == 1), key=lambda n: n["score"], reverse=True)
        best = kids[0]
        doc = next(d for d in docs[i] if d.title == best["title"])
        pred = _vllm_text(hf, context(i, doc), best["token_ids"], True)
        assert a.answer == " ".join(["", pred[:pred.index("[Retrieval]")] if "[Retrieval]" in pred else pred])
    # Long form without retrieval: vLLM's text of the continuation up to the first blank line.
    gated = LongFormSelfRAG(steered, compat="released", ndocs=3, max_new_tokens=12, mode="adaptive",
                            scoring=ScoringConfig.released(form="long", threshold=0.0))
    for i in range(3):
        a = gated.answer(qs[i], docs[i])
        assert not a.retrieved
        assert a.answer == continuation(i, 12).split("\n\n")[0]


def test_released_no_retrieval_answers_keep_the_first_words_space():
    """On the embedded model, which writes words: the script's answer keeps vLLM's leading space."""
    from selfrag_engine import Engine, SamplingParams
    from selfrag_engine.selfrag.short_form import SelfRAG
    from selfrag_engine.tiny.assets import read_examples

    model = tiny_model_dir()
    engine = Engine.from_pretrained(model, progress=False)
    hf = slow_llama_tokenizer().from_pretrained(model, legacy=True)
    tok = engine.tokenizer
    qs = [ex["question"] for ex in read_examples(model)["questions"][:5]]
    answers = SelfRAG(engine, compat="released", max_new_tokens=12, mode="never").answer_batch(qs)
    for q, a in zip(qs, answers):
        ctx = tok.encode(format_prompt(q)) + [tok.token_to_id("[No Retrieval]")]
        ids = engine.generate([ctx], SamplingParams(max_tokens=12, temperature=0.0))[0].token_ids
        assert a.answer == _answer_option(_vllm_text(hf, ctx, ids, True))
    # Not vacuous: the model wrote words, and the first one's space was kept.
    assert any(a.answer.startswith(" ") for a in answers), [a.answer for a in answers]
