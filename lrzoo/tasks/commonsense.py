"""Commonsense-8 in the LLM-Adapters format (Hu et al., arXiv 2304.01933; AGI-Edgerunners/LLM-Adapters),
reused unchanged by DoRA, LoRA-SB and PiSSA.

Each example is ``{"instruction", "input", "output", "answer"}``; the instruction already lists the
choices and ends with "Answer format: answer1/answer2/...", the output reads "the correct answer is
answer2". Training text is the Alpaca prompt + output; evaluation decodes with 4 beams, keeps the
response and takes the **first** match of the task's answer pattern (no match = wrong). For likelihood
scoring (``eval.mode=loglik``) :meth:`CommonsenseTask.choice_request` turns a row into its options: the
labels of its "Answer format:" line and the option texts the instruction lists.

Sources: LLM-Adapters' JSON files (no official hub id exists; several hub originals are
loading-script datasets that datasets>=4 rejects), read from GitHub at a pinned commit when
``data_dir`` is None, else from ``data_dir/commonsense/<Folder>/{train,test}.json``. The union
training set for ``commonsense/all`` is ``commonsense_170k.json`` when present, else the 8 train files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Record, Task, require_file, with_locations
from .files import read_json_list, require_fields
from .prompts import alpaca_prompt, response_text

LLM_ADAPTERS_RAW = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/816657208af4db747803f87ba40a4c71383fed7a"
UNION_FILE = "commonsense_170k.json"  # LLM-Adapters ft-training_set/commonsense_170k.json
LAYOUT = f"commonsense/<Folder>/train.json and commonsense/<Folder>/test.json (LLM-Adapters' dataset/<Folder>/), plus optionally commonsense/{UNION_FILE}"
FIELDS = ("instruction", "input", "output", "answer")

# LLM-Adapters' finetune.py holds out val_set_size examples of the training set with
# train_test_split(test_size=120, shuffle=True, seed=42) (DoRA's scripts keep 120).
VAL_SET_SIZE = 120
VAL_SEED = 42

# commonsense_evaluate.py: beam search with 4 beams and 32 new tokens. Its temperature 0.1 / top_p
# 0.75 / top_k 40 do nothing without sampling, so they are left out (transformers warns about them).
GENERATION_CONFIG = {"num_beams": 4, "do_sample": False, "max_new_tokens": 32}


@dataclass(frozen=True)
class CommonsenseSpec:
    key: str                    # public name: commonsense/<key>
    folder: str                 # LLM-Adapters dataset/<folder>/
    choices: tuple[str, ...]    # gold answers that can occur in this task's files
    pattern: str                # commonsense_evaluate.py's extraction regex (may allow more than `choices`)


def _numbered(word: str, n: int) -> tuple[str, ...]:
    return tuple(f"{word}{i}" for i in range(1, n + 1))


ANSWER5 = "|".join(_numbered("answer", 5))
SPECS = {spec.key: spec for spec in (
    CommonsenseSpec("boolq", "boolq", ("true", "false"), "true|false"),
    CommonsenseSpec("piqa", "piqa", _numbered("solution", 2), "solution1|solution2"),
    CommonsenseSpec("siqa", "social_i_qa", _numbered("answer", 3), ANSWER5),
    CommonsenseSpec("hellaswag", "hellaswag", _numbered("ending", 4), "|".join(_numbered("ending", 4))),
    CommonsenseSpec("winogrande", "winogrande", _numbered("option", 2), "option1|option2"),
    CommonsenseSpec("arc_e", "ARC-Easy", _numbered("answer", 5), ANSWER5),  # a handful of ARC items have 5 choices
    CommonsenseSpec("arc_c", "ARC-Challenge", _numbered("answer", 5), ANSWER5),
    CommonsenseSpec("obqa", "openbookqa", _numbered("answer", 4), ANSWER5),
)}
# commonsense/all validates and extracts with the union of the eight (its held-out rows mix tasks).
# The instruction's last line lists the labels ("Answer format: answer1/answer2/answer3"); the options are
# "Answer1: ... Answer2: ..." (ARC, OBQA, SIQA), "Solution1: ...\n\nSolution2: ..." (PIQA), "Option1: ..."
# (WinoGrande), "Ending1: ..." (HellaSwag); BoolQ lists none (its labels are the texts: true/false).
ANSWER_FORMAT = re.compile(r"Answer format:[ \t]*(\S+)")
OPTION_MARK = re.compile(r"\b(Answer|Solution|Option|Ending)(\d+):")


def choice_labels(prompt: str) -> list[str]:
    """The labels of the last "Answer format: a/b/c" line of ``prompt``; ValueError if there is none."""
    found = ANSWER_FORMAT.findall(prompt)
    if not found:
        raise ValueError(f"no 'Answer format: a/b/...' line in the prompt {prompt[-120:]!r}: not an LLM-Adapters "
                         "commonsense item, its options are unknown.")
    return found[-1].split("/")


def choice_texts(prompt: str, labels: list[str]) -> list[str]:
    """The text of each option ``labels`` names, read from the instruction in ``prompt``: what follows
    "Answer<k>:" (or Solution/Option/Ending) up to the next option or the "Answer format:" line. Labels
    that are words (BoolQ's true/false) are their own texts."""
    if not any(label[-1:].isdigit() for label in labels):
        return list(labels)
    end = prompt.rfind("Answer format:")
    marks = list(OPTION_MARK.finditer(prompt, 0, end))
    named = [m.group(1).lower() + m.group(2) for m in marks]
    if named != labels:
        raise ValueError(f"the instruction lists the options {named}, not the labels {labels} of its answer format; "
                         "cannot read the option texts (use eval.choices=label).")
    bounds = [m.end() for m in marks] + [end]
    return [prompt[bounds[k]:marks[k + 1].start() if k + 1 < len(marks) else end].strip() for k in range(len(marks))]


#: the instruction's lead-in before the question ("Please choose the correct answer to the question: ")
LEAD_IN = re.compile(r"Please [^:\n]*?: ")


def choice_question(prompt: str) -> str:
    """The bare question of an LLM-Adapters instruction in ``prompt``: after its "Please ...: " lead-in, before
    the first option ("Answer1:", ...) or the "Answer format:" line (BoolQ lists no options)."""
    lead = LEAD_IN.search(prompt)
    end = prompt.rfind("Answer format:")
    if lead is None or end < lead.end():
        raise ValueError(f"no 'Please ...: <question>' before 'Answer format:' in the prompt {prompt[-160:]!r}: "
                         "not an LLM-Adapters commonsense item, its question is unknown.")
    option = OPTION_MARK.search(prompt, lead.end(), end)
    return prompt[lead.end():option.start() if option else end].strip()


def question_context(prompt: str) -> str:
    """lm-evaluation-harness's plain multiple-choice context ``Question: <q>\nAnswer:`` (its ARC/OBQA/PIQA shape),
    for ``eval.choices=question`` and ``task.format=question``."""
    return f"Question: {choice_question(prompt)}\nAnswer:"


UNION = CommonsenseSpec("all", "", tuple(dict.fromkeys(c for s in SPECS.values() for c in s.choices)),
                        "|".join(dict.fromkeys(p for s in SPECS.values() for p in s.pattern.split("|"))))


class CommonsenseTask(Task):
    """Columns: ``prompt`` (Alpaca template), ``target`` (the output, "the correct answer is X"),
    ``answer`` (X). Splits: ``train``; ``validation`` = LLM-Adapters' 120 held-out training rows
    (``train`` excludes them); ``test`` = the benchmark's evaluation file."""

    kind = "generation"
    num_labels = 0
    metric_names = ("accuracy",)
    primary_metric = "accuracy"
    generation_config = GENERATION_CONFIG
    multiple_choice = True

    def __init__(self, spec: CommonsenseSpec, val_set_size: int = VAL_SET_SIZE):
        super().__init__(f"commonsense/{spec.key}")
        self.spec = spec
        self.val_set_size = val_set_size
        self._pattern = re.compile(spec.pattern)

    def _local_files(self, split: str, data_dir: Path) -> list[str]:
        if split == "test":
            return [f"commonsense/{self.spec.folder}/test.json"]
        return [f"commonsense/{relative}" for relative in self._train_files(data_dir)]

    def _train_files(self, data_dir: Path | None) -> list[str]:
        """The training file(s) under ``commonsense/`` (LLM-Adapters' ``dataset/``)."""
        return [f"{self.spec.folder}/train.json"]

    def _records(self, split: str, data_dir: Path | None) -> list[Record]:
        if split == "test":
            return self._file(f"{self.spec.folder}/test.json", data_dir)
        return self._hold_out(self._train_records(data_dir), split)

    def _train_records(self, data_dir: Path | None) -> list[Record]:
        return [record for relative in self._train_files(data_dir) for record in self._file(relative, data_dir)]

    def _file(self, relative: str, data_dir: Path | None) -> list[Record]:
        """Items of one LLM-Adapters JSON file; ``relative`` is under its dataset/ folder."""
        if data_dir is not None:
            return read_json_list(require_file(data_dir, f"commonsense/{relative}", "commonsense", LAYOUT))
        import datasets

        subdir = "ft-training_set" if relative == UNION_FILE else "dataset"
        url = f"{LLM_ADAPTERS_RAW}/{subdir}/{relative}"
        return with_locations(url, datasets.load_dataset("json", data_files=url, split="train"))

    def _hold_out(self, records: list[Record], split: str) -> list[Record]:
        """LLM-Adapters' train/validation partition of the training file (same permutation, as both
        use datasets' seeded ``train_test_split``); rows keep their file order within each part."""
        import datasets

        if len(records) <= self.val_set_size:
            raise ValueError(f"{self.name}: the training file has {len(records)} rows, too few to hold out the "
                             f"{self.val_set_size} validation rows of the LLM-Adapters protocol; use the full "
                             "LLM-Adapters train file.")
        index = datasets.Dataset.from_dict({"i": list(range(len(records)))})
        parts = index.train_test_split(test_size=self.val_set_size, shuffle=True, seed=VAL_SEED)
        keep = sorted(parts["test" if split == "validation" else "train"]["i"])
        return [records[i] for i in keep]

    def _row(self, record: Any, where: str, split: str) -> dict[str, str]:
        item = require_fields(record, FIELDS, where)
        if item["answer"] not in self.spec.choices:
            raise ValueError(f"{where}: answer {item['answer']!r} is not a valid {self.name} answer "
                             f"(expected one of {list(self.spec.choices)}); is this file from another task?")
        return {"prompt": alpaca_prompt(item["instruction"], item["input"], "\n"),
                "target": item["output"], "answer": item["answer"]}

    def extract_answer(self, generated: str) -> str:
        """First match of the task's pattern in the response (commonsense_evaluate.py); "" if none."""
        match = self._pattern.search(response_text(generated).strip())
        return match.group() if match else ""

    def is_correct(self, extracted: str, answer: str) -> bool:
        return bool(extracted) and extracted == answer

    def choice_request(self, row: dict[str, Any], choices: str = "label") -> tuple[str, list[str], int]:
        """The row as a multiple-choice item ``(context, continuations, gold index)`` (``eval.mode=loglik``).

        The options are the labels of the row's "Answer format:" line (ARC items have 3 to 5). ``choices="label"``:
        the context is the prompt and option i the target with the gold answer replaced by label i ("the
        correct answer is answer1", ...). ``choices="text"``: the context is the prompt plus the target up to
        the answer ("...### Response:\nthe correct answer is"), option i is " " + its text in the instruction.
        ``choices="question"``: lm-eval's plain shape, the context ``Question: <q>\nAnswer:`` without the
        instruction, the template or the listed options, option i " " + its text (:meth:`question_row` trains
        on the same shape).
        """
        labels = choice_labels(row["prompt"])
        answer, target = row["answer"], row["target"]
        if answer not in labels:
            raise ValueError(f"{self.name}: the gold answer {answer!r} is not among the labels {labels} of the row's "
                             "answer format.")
        head, found, tail = target.rpartition(answer)
        if not found:
            raise ValueError(f"{self.name}: the target {target!r} does not contain the gold answer {answer!r}.")
        if choices == "label":
            return row["prompt"], [head + label + tail for label in labels], labels.index(answer)
        if choices == "question":
            return question_context(row["prompt"]), [" " + text for text in choice_texts(row["prompt"], labels)], \
                labels.index(answer)
        if choices != "text":
            raise ValueError(f"choices={choices!r}: must be 'label', 'text' or 'question'.")
        return row["prompt"] + head.rstrip(), [" " + text for text in choice_texts(row["prompt"], labels)], \
            labels.index(answer)

    def question_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` for training in the ``question`` format (``task.format=question``): the context and the gold
        option of :meth:`choice_request` ``(row, "question")`` as prompt and target, so training and
        ``eval.choices=question`` scoring see the same text."""
        context, options, gold = self.choice_request(row, "question")
        return {**row, "prompt": context, "target": options[gold]}


class CommonsenseUnion(CommonsenseTask):
    """``commonsense/all``: train on the union of the 8 training sets (DoRA's commonsense_170k),
    evaluate each of the 8 test sets with its own task (see ``eval_tasks``)."""

    splits = ("train", "validation")

    def __init__(self, val_set_size: int = VAL_SET_SIZE):
        super().__init__(UNION, val_set_size)
        self.eval_tasks = tuple(f"commonsense/{key}" for key in SPECS)

    def _train_files(self, data_dir: Path | None) -> list[str]:
        if data_dir is None or (data_dir / "commonsense" / UNION_FILE).is_file():
            return [UNION_FILE]
        return [f"{spec.folder}/train.json" for spec in SPECS.values()]

    def _train_records(self, data_dir: Path | None) -> list[Record]:
        if data_dir is not None and not (data_dir / "commonsense" / UNION_FILE).is_file():
            missing = [s.folder for s in SPECS.values() if not (data_dir / "commonsense" / s.folder / "train.json").is_file()]
            if missing:
                raise FileNotFoundError(
                    f"commonsense/all needs {data_dir / 'commonsense' / UNION_FILE} (LLM-Adapters "
                    f"ft-training_set/{UNION_FILE}) or all 8 per-task train.json files; missing train.json for {missing}. "
                    f"Download {UNION_FILE} into {data_dir / 'commonsense'}, or train on a single task (e.g. commonsense/boolq).")
        return super()._train_records(data_dir)


TASKS = {f"commonsense/{key}": (lambda spec=spec: CommonsenseTask(spec)) for key, spec in SPECS.items()}
TASKS["commonsense/all"] = CommonsenseUnion
