"""`make demo` says what it is doing before each slow part (loading the encoder, indexing the corpus), then
answers: run here with the hashing encoder, which needs no model download."""
import re

from selfrag_engine.entrypoints.demo import main
from selfrag_engine.tiny.assets import read_corpus, read_examples
from selfrag_engine.tiny.evaluate import world_and_split
from selfrag_engine.tiny.long_form_data import demo_requests


def test_the_demo_announces_its_slow_work_and_answers(capsys):
    main(["--encoder", "hashing:256", "--questions", "1", "--instructions", "0", "--long-form", "0", "--ndocs", "3"])
    out = capsys.readouterr().out.splitlines()
    n = len(read_corpus())
    assert out[0] == "Loading the hashing:256 encoder ..."
    assert out[1].startswith(f"Indexing {n} passages of ") and out[1].endswith("with hashing:256 ...")
    assert out[2].startswith(f"Indexed {n} passages in ")
    question = read_examples()["questions"][0]["question"]
    assert any(line.startswith(f"Question: {question}") for line in out)
    assert any(line.startswith("Answer: ") for line in out)


def test_the_demo_shows_a_long_answer_with_the_passage_each_segment_cites(capsys):
    main(["--encoder", "hashing:256", "--questions", "0", "--instructions", "0", "--long-form", "1"])
    out = capsys.readouterr().out
    request = (read_examples().get("long_form") or demo_requests(*world_and_split()))[0]
    start = out.index(f"Long-form request: {request['instruction']}")
    lines = out[start:].splitlines()
    assert lines[2].startswith("Answer: ") and lines[3].startswith("Score: ")
    header = lines.index("    #  cites                         relevance  grounding    score  text")
    given = lines.index("Passages given:")
    segments, passages = lines[header + 1:given - 1], lines[given + 1:given + 6]
    assert segments and all(re.match(r"^ +\d+  ", row) for row in segments), segments
    # The five passages the index returned, each marked with the segments that cite it; every passage a segment
    # cites is among them.
    corpus = {p.id: p.title for p in read_corpus()}
    shown = {}
    for row in passages:
        m = re.match(r"^   \[(\w+)\] (.+?) +(cited by segments? [\d, ]+|not cited)  ", row)
        assert m and corpus[m.group(1)].startswith(m.group(2).rstrip("…")), row
        shown[m.group(1)] = m.group(3)
    for i, row in enumerate(segments, 1):
        cited = re.match(r"^ +\d+  \[(\w+)\]", row)
        if cited:
            assert str(i) in re.findall(r"\d+", shown.get(cited.group(1), "")), (row, shown)
        else:
            assert row.split()[1] == "(none)", row
