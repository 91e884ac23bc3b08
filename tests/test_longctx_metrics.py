"""LongBench metrics and truncation against hand-computed cases."""

from __future__ import annotations

import pytest

from tokenfilter.longctx import metrics as m
from tokenfilter.longctx.longbench import ENGLISH_TASKS, Sample, postprocess, score, truncate_middle


def test_normalize_answer() -> None:
    assert m.normalize_answer("The  Cat, a dog!") == "cat dog"
    assert m.normalize_answer("An apple-pie.") == "applepie"
    assert m.normalize_answer("theory") == "theory"  # articles only as whole words


def test_qa_f1() -> None:
    # pred [big, red, dog], truth [red, dog, barked]: 2 shared, P = R = 2/3.
    assert m.qa_f1_score("the big red dog", "A red dog barked.") == pytest.approx(2 / 3)
    assert m.qa_f1_score("Bob Dylan", "bob dylan") == 1.0
    assert m.qa_f1_score("nothing", "Bob Dylan") == 0.0
    assert m.qa_f1_score("", "Bob Dylan") == 0.0
    # multiplicity: pred [dog, dog], truth [dog]: 1 shared, P = 1/2, R = 1, F1 = 2/3
    assert m.qa_f1_score("dog dog", "dog") == pytest.approx(2 / 3)


def test_rouge_l() -> None:
    # LCS of [the cat sat on the mat] and [the cat is on the mat] is 5 of 6 each side.
    assert m.rouge_l_score("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # pred 2 tokens, ref 4, LCS 2: P = 1, R = 1/2, F = 2/3
    assert m.rouge_l_score("cat mat", "the cat on mat") == pytest.approx(2 / 3)
    assert m.rouge_l_score("", "the cat") == 0.0
    assert m.rouge_l_score("dog", "the cat") == 0.0


def test_rouge_l_agrees_with_rouge_score() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [
        ("Elizabeth bought coffee beans; she will meet Anne on Sunday.", "Elizabeth bought coffe beans at a cafe."),
        ("A B C D E F", "F E D C B A"),
        ("the report says funds rose 12% in 2019", "In 2019, the funds rose by 12 percent, the report says."),
    ]
    for pred, ref in pairs:
        assert m.rouge_l_score(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)


def test_classification() -> None:
    classes = ["Food", "Date", "city", "other city"]
    assert m.classification_score("Date", "Date", all_classes=classes) == 1.0
    assert m.classification_score("Date or Food", "Date", all_classes=classes) == 0.5
    assert m.classification_score("Food", "Date", all_classes=classes) == 0.0
    # "city" is a strict substring of the right class "other city": not counted against it.
    assert m.classification_score("other city", "other city", all_classes=classes) == 1.0
    # but when the right class is "city", "other city" named too halves the score
    assert m.classification_score("other city", "city", all_classes=classes) == 0.5


def test_retrieval_and_count() -> None:
    assert m.retrieval_score("Paragraph 19", "Paragraph 19") == 1.0
    assert m.retrieval_score("Paragraph 3 or Paragraph 19", "Paragraph 19") == 0.5
    assert m.retrieval_score("I do not know", "Paragraph 19") == 0.0
    assert m.retrieval_score("Paragraph 191", "Paragraph 19") == 0.0
    assert m.count_score("There are 46 unique paragraphs.", "46") == 1.0
    assert m.count_score("46 out of 50", "46") == 0.5
    assert m.count_score("many", "46") == 0.0


def test_edit_similarity_and_code() -> None:
    # LCS("kitten", "sitting") = "ittn" (4): 2*4 / (6 + 7)
    assert m.edit_similarity("kitten", "sitting") == pytest.approx(8 / 13)
    assert m.edit_similarity("abc", "abc") == 1.0
    assert m.edit_similarity("", "abc") == 0.0
    assert m.first_code_line("\n```python\n# a comment\n    x = 1\ny = 2") == "    x = 1"
    assert m.first_code_line("// c comment\n`x`") == ""
    assert m.code_sim_score("```python\n    x = 1\n", "    x = 1") == 1.0
    # "x = 1" vs "x = 2": LCS 4 of 5 + 5 characters
    assert m.code_sim_score("x = 1", "x = 2") == pytest.approx(0.8)


def test_contains_answer() -> None:
    assert m.contains_answer(" 7,481,263.", "7481263") == 1.0
    assert m.contains_answer("The number is 7481263!", "7481263") == 1.0
    assert m.contains_answer("7481236", "7481263") == 0.0
    assert m.contains_answer("anything", "") == 0.0


def test_score_sample_takes_best_answer() -> None:
    assert m.score_sample("qa_f1", "fifty-five", ["55", "fifty-five"]) == 1.0
    assert m.score_sample("qa_f1", "55 mph", ["55", "fifty-five"]) == pytest.approx(2 / 3)
    assert m.score_sample("qa_f1", "x", []) == 0.0


def test_longbench_task_table() -> None:
    assert len(ENGLISH_TASKS) == 16
    assert ENGLISH_TASKS["gov_report"].max_new_tokens == 512
    assert ENGLISH_TASKS["hotpotqa"].max_new_tokens == 32
    assert not ENGLISH_TASKS["lcc"].chat and ENGLISH_TASKS["qasper"].chat
    assert {t.metric for t in ENGLISH_TASKS.values()} == set(m.METRICS)


def test_longbench_postprocess_and_score() -> None:
    assert postprocess("trec", "\nIndividual\nQuestion: next") == "Individual"
    assert postprocess("qasper", "a\nb") == "a\nb"
    trec = Sample("trec", "0", "prompt", ("Individual",), ("Individual", "Date", "Other entity"))
    assert score(trec, "Individual\nQuestion: When was it ? Type: Date") == 1.0
    assert score(trec, "Date") == 0.0
    retrieval = Sample("passage_retrieval_en", "0", "p", ("Paragraph 19",))
    assert score(retrieval, "Paragraph 19") == 1.0


def test_truncate_middle() -> None:
    ids = list(range(10))
    assert truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert truncate_middle(ids, 5) == [0, 1, 7, 8, 9]
    assert truncate_middle(ids, 10) == ids
    assert truncate_middle(ids, 20) == ids
    assert len(truncate_middle(list(range(1000)), 333)) == 333
    with pytest.raises(ValueError):
        truncate_middle(ids, 0)
