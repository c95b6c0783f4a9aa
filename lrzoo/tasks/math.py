"""Math word problems in the MetaMath protocol (Yu et al., arXiv 2309.12284; meta-math/MetaMath
eval_gsm8k.py / eval_math.py), as used by PiSSA and LoRA-SB.

Prompt: the Alpaca no-input template; evaluation appends "Let's think step by step." after
``### Response:`` and decodes greedily. Targets end with "The answer is: X" (MetaMathQA's format).
Extraction reads the text after the **last** "The answer is: ":

* GSM8K: the first signed number there (``[-+]?\\d*[.,/]?\\d+``), commas dropped, a simple fraction
  evaluated, rounded to an integer; gold is the number after "#### ".
* MATH: that text up to the first ".\\n", without a final "."; gold is the last ``\\boxed{}`` of the
  solution; the two are compared with Hendrycks' normalisation (math_equiv.py).
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from .base import Record, Task, require_file, with_locations
from .files import read_json_list, read_jsonl, require_fields
from .math_equiv import is_equiv, last_boxed
from .prompts import alpaca_prompt, response_text

ANSWER_MARK = "The answer is: "
COT_LEAD = " Let's think step by step."
# MetaMath's vLLM stop strings: anything after them is the model starting a new turn.
STOP_STRINGS = ("Instruction:", "Response:")
# Greedy decoding; 256 new tokens as in LoRA-SB's vLLM evaluation (recipes.md §2c).
GENERATION_CONFIG = {"do_sample": False, "num_beams": 1, "max_new_tokens": 256}
LAYOUT = "gsm8k/train.jsonl, gsm8k/test.jsonl, math/math500_test.jsonl (and metamathqa/MetaMathQA-395K.json to train for MATH)"

_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: "= <<16-3-4=9>>9"


def _final_answer_text(generated: str) -> str | None:
    """Text after the last "The answer is: " in the response, cut at a stop string; None if absent."""
    text = response_text(generated)
    for stop in STOP_STRINGS:
        text = text.split(stop)[0]
    parts = text.split(ANSWER_MARK)
    return parts[-1] if len(parts) > 1 else None


class MathTask(Task):
    """Columns: ``prompt``, ``target`` (" <reasoning>\\nThe answer is: X" for training), ``answer`` (X).

    Training rows use MetaMath's training prompt (ending at ``### Response:``); evaluation rows add
    " Let's think step by step." as MetaMath's eval scripts do. The target starts with a space so a
    trained response reads "### Response: <reasoning>", the same spacing the eval prompt has.
    """

    kind = "generation"
    num_labels = 0
    metric_names = ("accuracy",)
    primary_metric = "accuracy"
    splits = ("train", "test")
    generation_config = GENERATION_CONFIG

    def _prompt(self, question: str, split: str) -> str:
        return alpaca_prompt(question, response_lead="" if split == "train" else COT_LEAD)


class Gsm8kTask(MathTask):
    """GSM8K (Cobbe et al., arXiv 2110.14168): hub ``openai/gsm8k`` (config main) or
    ``data_dir/gsm8k/{train,test}.jsonl``. The train split is GSM8K's own 7473 problems rewritten to
    MetaMathQA's answer format (calculator annotations removed, "#### X" -> "The answer is: X");
    the papers train on MetaMathQA, which is GSM8K + MATH augmented."""

    def __init__(self):
        super().__init__("math/gsm8k")

    def _local_files(self, split: str, data_dir: Path) -> list[str]:
        return [f"gsm8k/{split}.jsonl"]

    def _records(self, split: str, data_dir: Path | None) -> list[Record]:
        if data_dir is not None:
            return read_jsonl(require_file(data_dir, self._local_files(split, data_dir)[0], "gsm8k", LAYOUT))
        import datasets

        return with_locations(f"openai/gsm8k:main {split}", datasets.load_dataset("openai/gsm8k", "main", split=split))

    def _row(self, record: Any, where: str, split: str) -> dict[str, str]:
        item = require_fields(record, ("question", "answer"), where)
        reasoning, mark, gold = item["answer"].rpartition("#### ")
        gold = gold.strip().replace(",", "")
        if not mark or _NUMBER.fullmatch(gold) is None:
            raise ValueError(f"{where}: the answer must end with '#### <number>' (GSM8K format), got "
                             f"{item['answer'][-60:]!r}; fix or drop that row.")
        target = f" {_CALCULATOR.sub('', reasoning).strip()}\n{ANSWER_MARK}{gold}"
        return {"prompt": self._prompt(item["question"], split), "target": target, "answer": gold}

    def extract_answer(self, generated: str) -> str:
        """The integer MetaMath's eval_gsm8k.py reads from a generation, as a string ("" if none)."""
        text = _final_answer_text(generated)
        match = _NUMBER.search(text) if text is not None else None
        if match is None:
            return ""
        number = match.group().replace(",", "")
        numerator, _, denominator = number.partition("/")
        if not numerator.lstrip("+-"):  # "/5": no numerator, eval_gsm8k.py reads no answer
            return ""
        # eval_gsm8k.py keeps the numerator when the denominator is 0 rather than failing.
        value = Fraction(numerator) / Fraction(denominator) if denominator.strip("0") else Fraction(numerator)
        return str(round(value))

    def is_correct(self, extracted: str, answer: str) -> bool:
        try:
            return Fraction(extracted) == Fraction(answer.replace(",", ""))
        except ValueError:  # "" (nothing extracted) or not a number
            return False


class Math500Task(MathTask):
    """MATH-500 (Lightman et al., arXiv 2305.20050: 500 MATH test problems): hub
    ``HuggingFaceH4/MATH-500`` or ``data_dir/math/math500_test.jsonl``. It has no training split of
    its own: ``train`` is MetaMathQA (hub ``meta-math/MetaMathQA``, or
    ``data_dir/metamathqa/MetaMathQA-395K.json``), the training set of MetaMath and PiSSA."""

    def __init__(self):
        super().__init__("math/math500")

    def _local_files(self, split: str, data_dir: Path) -> list[str]:
        return ["metamathqa/MetaMathQA-395K.json" if split == "train" else "math/math500_test.jsonl"]

    def _records(self, split: str, data_dir: Path | None) -> list[Record]:
        if split == "train":
            if data_dir is not None:
                return read_json_list(require_file(data_dir, self._local_files(split, data_dir)[0], "metamathqa", LAYOUT))
            source = "meta-math/MetaMathQA"
        else:
            if data_dir is not None:
                return read_jsonl(require_file(data_dir, self._local_files(split, data_dir)[0], "math", LAYOUT))
            source = "HuggingFaceH4/MATH-500"
        import datasets

        hub_split = "train" if split == "train" else "test"
        return with_locations(f"{source} {hub_split}", datasets.load_dataset(source, split=hub_split))

    def _row(self, record: Any, where: str, split: str) -> dict[str, str]:
        if split == "train":
            item = require_fields(record, ("query", "response"), where)
            reasoning, mark, gold = item["response"].rpartition(ANSWER_MARK)
            if not mark:
                raise ValueError(f"{where}: a MetaMathQA response must end with '{ANSWER_MARK}<answer>'; fix or drop that row.")
            return {"prompt": self._prompt(item["query"], split), "target": " " + item["response"].lstrip(),
                    "answer": gold.strip()}
        item = require_fields(record, ("problem", "solution"), where)
        gold = last_boxed(item["solution"])
        if not gold:
            raise ValueError(f"{where}: the solution has no \\boxed{{...}} final answer (MATH format); fix or drop that row.")
        return {"prompt": self._prompt(item["problem"], split), "target": item["solution"], "answer": gold}

    def extract_answer(self, generated: str) -> str:
        """eval_math.py's prediction: the final-answer text up to ".\\n", without a trailing "."."""
        text = _final_answer_text(generated)
        if text is None:
            return ""
        text = text.split(".\n")[0].strip()
        return text[:-1].strip() if text.endswith(".") else text

    def is_correct(self, extracted: str, answer: str) -> bool:
        return bool(extracted) and is_equiv(extracted, answer)


TASKS = {"math/gsm8k": Gsm8kTask, "math/math500": Math500Task}
