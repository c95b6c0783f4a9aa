"""Answer extraction and MATH normalisation on hand-written generations."""

from __future__ import annotations

import pytest

from lrzoo.tasks import get_task
from lrzoo.tasks.math_equiv import is_equiv, last_boxed, strip_string
from lrzoo.tasks.prompts import alpaca_prompt

# ---- commonsense: first match of the task's pattern in the response ---------------------------


@pytest.mark.parametrize("name, generated, expected", [
    ("commonsense/boolq", "the correct answer is true", "true"),
    ("commonsense/boolq", "false, although true is tempting", "false"),          # first match wins
    ("commonsense/boolq", "The correct answer is True", ""),                     # case-sensitive, as in LLM-Adapters
    ("commonsense/piqa", "solution2 is better than solution1", "solution2"),
    ("commonsense/siqa", "the correct answer is answer3", "answer3"),
    ("commonsense/arc_c", "answer5", "answer5"),
    ("commonsense/hellaswag", "ending4", "ending4"),
    ("commonsense/hellaswag", "answer1", ""),                                    # another task's vocabulary
    ("commonsense/winogrande", "option1 fits the blank", "option1"),
    ("commonsense/obqa", "I am not sure", ""),
])
def test_commonsense_takes_the_first_match(name, generated, expected):
    assert get_task(name).extract_answer(generated) == expected


def test_commonsense_reads_only_the_response_of_a_full_decode():
    task = get_task("commonsense/boolq")
    prompt = alpaca_prompt("Answer true or false: is water wet?\n\nAnswer format: true/false", "", "\n")
    assert task.extract_answer(prompt + "the correct answer is false") == "false"


def test_commonsense_is_correct_is_an_exact_match_and_empty_is_wrong():
    task = get_task("commonsense/arc_e")
    assert task.is_correct("answer2", "answer2")
    assert not task.is_correct("answer1", "answer2")
    assert not task.is_correct("", "")


def test_commonsense_all_accepts_any_of_the_eight_vocabularies():
    task = get_task("commonsense/all")
    assert task.extract_answer("the correct answer is ending3") == "ending3"
    assert task.extract_answer("the correct answer is false") == "false"


# ---- GSM8K: first number after the last "The answer is: ", rounded -----------------------------


@pytest.mark.parametrize("generated, expected", [
    ("3 + 4 = 7.\nThe answer is: 7", "7"),
    ("The answer is: 5\nWait. The answer is: 12 apples", "12"),                   # last marker wins
    ("The answer is: 1,234", "1234"),                                             # comma dropped
    ("The answer is: $3.60", "4"),                                                # rounded to an integer
    ("The answer is: -8", "-8"),
    ("The answer is: 7/2", "4"),                                                  # 3.5 -> 4 (round half to even)
    ("The answer is: 5/0", "5"),                                                  # eval_gsm8k.py keeps the numerator
    ("The answer is: 9 and 10", "9"),                                             # first number after the marker
    ("so the total is 42", ""),                                                   # no marker
    ("The answer is: forty-two", ""),                                             # no number
    ("The answer is: 3\n\n### Instruction:\nThe answer is: 99", "3"),             # cut at the stop string
])
def test_gsm8k_extraction(generated, expected):
    assert get_task("math/gsm8k").extract_answer(generated) == expected


def test_gsm8k_is_correct_compares_numbers():
    task = get_task("math/gsm8k")
    assert task.is_correct("1234", "1,234")
    assert task.is_correct("18", "18")
    assert not task.is_correct("17", "18")
    assert not task.is_correct("", "18")


# ---- MATH: text after the last "The answer is: " up to ".\n", Hendrycks-equivalent to the gold --


@pytest.mark.parametrize("generated, expected", [
    ("so x = 1/2.\nThe answer is: \\frac{1}{2}", "\\frac{1}{2}"),
    ("The answer is: 3.\nThe end.", "3"),                                         # cut at ".\n"
    ("The answer is: 10.", "10"),                                                 # trailing period dropped
    ("The answer is: (3, \\frac{\\pi}{2})", "(3, \\frac{\\pi}{2})"),
    ("no final answer here", ""),
])
def test_math_extraction(generated, expected):
    assert get_task("math/math500").extract_answer(generated) == expected


@pytest.mark.parametrize("prediction, gold", [
    ("\\frac12", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"),
    ("\\sqrt3", "\\sqrt{3}"),
    ("x = 5", "5"),
    ("90^\\circ", "90"),
    ("\\$18", "18"),
    ("25\\%", "25"),
    ("5 \\text{ cm}", "5"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    (".5", "0.5"),
])
def test_math_equivalent_forms(prediction, gold):
    assert is_equiv(prediction, gold)


@pytest.mark.parametrize("prediction, gold", [("2", "3"), ("\\frac{1}{3}", "\\frac{1}{2}"), ("2.0", "2"), ("xy = 5", "6")])
def test_math_different_answers_stay_different(prediction, gold):
    assert not is_equiv(prediction, gold)


def test_strip_string_canonical_form():
    assert strip_string("\\tfrac 3 4") == "\\frac{3}{4}"
    assert strip_string("k = \\frac1{2}") == "\\frac{1}{2}"


@pytest.mark.parametrize("solution, gold", [
    ("so $x = \\boxed{5}$.", "5"),
    ("first \\boxed{1}, finally \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),   # last one, nested braces
    ("the answer is $\\boxed 7$.", "7"),
    ("\\fbox{9}", "9"),
    ("no box", None),
    ("broken \\boxed{3", None),
])
def test_last_boxed(solution, gold):
    assert last_boxed(solution) == gold


def test_math_correct_needs_an_extracted_answer():
    task = get_task("math/math500")
    assert task.is_correct(task.extract_answer("The answer is: \\dfrac{1}{2}."), "\\frac{1}{2}")
    assert not task.is_correct("", "")


def test_label_tasks_have_no_extraction():
    with pytest.raises(TypeError, match="classification task"):
        get_task("glue/sst2").extract_answer("positive")
