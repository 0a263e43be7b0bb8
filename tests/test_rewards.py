"""Tests for memagent_jax.rl.rewards: boxed extraction, MATH verifier, SQuAD metrics, RULER."""

from __future__ import annotations

import pytest

from memagent_jax.rl import rewards as R

# ----------------------------------------------------------------------------- boxed_answer


def test_boxed_simple_and_nested():
    assert R.boxed_answer(r"so the result is \boxed{42}.") == "42"
    assert R.boxed_answer(r"x = \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert R.boxed_answer(r"\boxed{{a}{b{c}}}") == "{a}{b{c}}"


def test_boxed_last_wins():
    assert R.boxed_answer(r"\boxed{1} then \boxed{2} finally \boxed{3}") == "3"
    assert R.boxed_answer(r"\boxed{Paris} or \fbox{London}") == "London"
    assert R.boxed_answer(r"\fbox{London} or \boxed{Paris}") == "Paris"


def test_boxed_outside_last_300_chars_ignored():
    text = r"\boxed{early}" + "x" * 300
    assert R.boxed_answer(text) is None
    text2 = r"\boxed{early}" + "x" * 300 + r"\boxed{late}"
    assert R.boxed_answer(text2) == "late"
    # A box whose start is cut by the window is not recognized.
    text3 = "y" * 10 + r"\boxed{cut}" + "z" * 295
    assert R.boxed_answer(text3) is None
    # ... but a box fully inside the last 300 characters is.
    text4 = "y" * 1000 + r"\boxed{inside}" + "z" * 280
    assert R.boxed_answer(text4) == "inside"


def test_boxed_none_cases():
    assert R.boxed_answer("no box here") is None
    assert R.boxed_answer("") is None
    assert R.boxed_answer(None) is None
    assert R.boxed_answer(r"\boxed{unclosed") is None
    assert R.boxed_answer(r"ends with \boxed") is None


def test_fbox_and_space_form():
    assert R.boxed_answer(r"answer \fbox{7}") == "7"
    assert R.boxed_answer(r"the answer is $\boxed 5$ ok") == "5"
    assert R.boxed_answer(r"\boxed 12") == "12"
    assert R.boxed_answer(r"\boxed {x+1}") == "x+1"


def test_boxed_preserves_case():
    assert R.boxed_answer(r"\boxed{Paris}") == "Paris"


# ----------------------------------------------------------------------------- normalize / verify


def test_normalize_math():
    assert R.normalize_math(r"\left( 1, 2 \right)") == "(1,2)"
    assert R.normalize_math(r"\dfrac{1}{2}") == r"\frac{1}{2}"
    assert R.normalize_math(r"\tfrac{3}{4}") == r"\frac{3}{4}"
    assert R.normalize_math("90^{\\circ}") == "90"
    assert R.normalize_math("90^\\circ") == "90"
    assert R.normalize_math(r"\$5") == "5"
    assert R.normalize_math(r"50\%") == "50"
    assert R.normalize_math("a\\!b\nc") == "abc"
    assert R.normalize_math("New York") == "newyork"


def test_verify_matches():
    assert R.verify(r"The answer is \boxed{Paris}", ["paris"]) == 1.0
    assert R.verify(r"\boxed{PARIS}", "Paris") == 1.0
    assert R.verify(r"\boxed{New  York}", ["new york"]) == 1.0  # spaces dropped
    assert R.verify(r"\boxed{\left(1,2\right)}", ["(1, 2)"]) == 1.0
    assert R.verify(r"\boxed{\dfrac{1}{2}}", [r"\frac{1}{2}"]) == 1.0
    assert R.verify(r"\boxed{London}", ["Paris", "London"]) == 1.0


def test_verify_mismatches():
    assert R.verify(r"\boxed{Lyon}", ["Paris", "London"]) == 0.0
    assert R.verify("Paris", ["Paris"]) == 0.0  # no box
    assert R.verify(r"\boxed{}", ["Paris"]) == 0.0  # empty box
    assert R.verify("", ["Paris"]) == 0.0
    assert R.verify(r"\boxed{Paris}" + " " * 300, ["Paris"]) == 0.0  # outside the window
    assert R.verify(r"\boxed{Paris} then \boxed{Rome}", ["Paris"]) == 0.0  # last box wins


def test_answer_is_extract():
    assert R.answer_is_extract("Therefore, the answer is Paris.") == "Paris"
    assert R.answer_is_extract("The answer is 3. Hmm, THE ANSWER IS  4 . ") == "4"
    assert R.answer_is_extract("the answer is: Marie Curie") == "Marie Curie"
    assert R.answer_is_extract("no final phrase") is None
    assert R.answer_is_extract(None) is None


# ----------------------------------------------------------------------------- SQuAD metrics


def test_normalize_answer():
    assert R.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert R.normalize_answer("a cat, an owl & the dog.") == "cat owl dog"
    assert R.normalize_answer("Theatre") == "theatre"  # 'the' only as a word
    assert R.normalize_answer("  U.S.A.\n") == "usa"


def test_em():
    assert R.em("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert R.em("Eiffel", ["eiffel tower"]) == 0.0
    assert R.em("Paris", ["London", "paris!"]) == 1.0
    assert R.em("Paris", "Paris") == 1.0


def test_sub_em_both_directions():
    assert R.sub_em("It is the Eiffel Tower in Paris", ["Eiffel Tower"]) == 1.0  # gold in pred
    assert R.sub_em("Eiffel", ["the Eiffel Tower"]) == 1.0  # pred in gold
    assert R.sub_em("Louvre", ["Eiffel Tower", "Notre Dame"]) == 0.0
    assert R.sub_em("Notre Dame cathedral", ["Eiffel Tower", "Notre Dame"]) == 1.0


def test_f1_values():
    assert R.f1("eiffel tower", ["eiffel tower"]) == pytest.approx(1.0)
    # pred 3 tokens, gold 2 tokens, 2 shared: P = 2/3, R = 1, F1 = 0.8
    assert R.f1("the eiffel tower paris", ["Eiffel Tower"]) == pytest.approx(0.8)
    assert R.f1("london", ["eiffel tower"]) == 0.0
    # max over golds: 1 shared of pred 2 / gold 1 -> P 0.5 R 1 F1 2/3; second gold gives 1.0
    assert R.f1("big apple", ["apple", "big apple"]) == pytest.approx(1.0)
    assert R.f1("big apple", ["apple"]) == pytest.approx(2 / 3)


def test_f1_yes_no_rule():
    assert R.f1("yes", ["yes"]) == 1.0
    assert R.f1("no", ["yes"]) == 0.0
    # "yes it is" vs "yes": plain token F1 would be 0.5 but gold is a yes/no class
    assert R.f1("yes it is", ["yes"]) == 0.0
    assert R.f1("yes", ["yes it is"]) == 0.0
    assert R.f1("noanswer", ["no answer"]) == 0.0


@pytest.mark.parametrize("pred", [None, "", "   ", "\n\t", "the", "!!"])
def test_empty_prediction_scores_zero(pred):
    golds = ["Paris", "the Eiffel Tower"]
    assert R.em(pred, golds) == 0.0
    assert R.sub_em(pred, golds) == 0.0
    assert R.f1(pred, golds) == 0.0
    assert R.string_match_all(pred, golds) == 0.0


def test_empty_gold_does_not_match_everything():
    assert R.sub_em("Paris", [""]) == 0.0
    assert R.sub_em("Paris", ["", "paris"]) == 1.0


def test_string_match_all():
    assert R.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert R.string_match_all("The numbers are 123 and 789.", ["123", "456"]) == 0.5
    assert R.string_match_all("found ABC-def", ["abc-DEF", "x", "y", "z"]) == 0.25
    assert R.string_match_all("nothing", ["123"]) == 0.0
    assert R.string_match_all("value 7", "7") == 1.0
    assert R.string_match_all("value 7", []) == 0.0
