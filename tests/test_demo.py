"""`make demo` says what it is doing before each slow part (loading the encoder, indexing the corpus), then
answers: run here with the hashing encoder, which needs no model download."""
from selfrag_engine.entrypoints.demo import main
from selfrag_engine.tiny.assets import read_corpus, read_examples


def test_the_demo_announces_its_slow_work_and_answers(capsys):
    main(["--encoder", "hashing:256", "--questions", "1", "--instructions", "0", "--ndocs", "3"])
    out = capsys.readouterr().out.splitlines()
    n = len(read_corpus())
    assert out[0] == "Loading the hashing:256 encoder ..."
    assert out[1].startswith(f"Indexing {n} passages of ") and out[1].endswith("with hashing:256 ...")
    assert out[2].startswith(f"Indexed {n} passages in ")
    question = read_examples()["questions"][0]["question"]
    assert any(line.startswith(f"Question: {question}") for line in out)
    assert any(line.startswith("Answer: ") for line in out)
