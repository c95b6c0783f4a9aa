"""Loading from small hand-written files in the ../shared/data layout, and every bad-input error."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import datasets
import pytest

from lrzoo.tasks import get_task, list_tasks
from lrzoo.tasks.commonsense import SPECS, CommonsenseTask, CommonsenseUnion
from lrzoo.tasks.prompts import alpaca_prompt


def write(root, relative, text, encoding="utf-8"):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def tsv(*rows):
    return "".join("\t".join(row) + "\n" for row in rows)


def cs_item(answer, instruction="Pick one.", output=None):
    return {"instruction": instruction, "input": "", "output": output or f"the correct answer is {answer}", "answer": answer}


# ---- task names and splits --------------------------------------------------------------------


def test_every_contract_name_is_registered():
    glue = [f"glue/{t}" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")]
    cs = [f"commonsense/{t}" for t in ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "all")]
    assert list_tasks() == glue + cs + ["math/gsm8k", "math/math500", "pretrain/wikitext2"]


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"(?i)unknown task 'glue/sst3'.*glue/sst2.*math/math500"):
        get_task("glue/sst3")


def test_unknown_split_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"no split 'dev'.*\['train', 'validation', 'test'\]"):
        get_task("glue/rte").load_split("dev", tmp_path)


@pytest.mark.parametrize("limit", [-1, 1.5, True])
def test_bad_limit_is_an_error(tmp_path, limit):
    with pytest.raises(ValueError, match="limit"):
        get_task("glue/rte").load_split("train", tmp_path, limit=limit)


def test_tasks_know_nothing_about_adapters():
    import lrzoo.tasks

    forbidden = {"methods", "layer", "registry", "peft_bridge", "wrap", "peft", "kernels"}
    for path in Path(lrzoo.tasks.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level:
                    modules += [a.name for a in node.names]
                parts = {part for module in modules for part in module.split(".")}
                assert not parts & forbidden, f"{path.name} imports {modules}"


# ---- GLUE TSVs --------------------------------------------------------------------------------


def test_cola_has_no_header_and_keeps_quotes(tmp_path):
    write(tmp_path, "glue/CoLA/train.tsv", tsv(("gj04", "1", "", 'He said "hi".'), ("gj04", "0", "*", "Him left.")))
    rows = get_task("glue/cola").load_split("train", tmp_path)
    assert rows.to_list() == [{"text_a": 'He said "hi".', "text_b": None, "label": 1},
                              {"text_a": "Him left.", "text_b": None, "label": 0}]


def test_mrpc_byte_order_mark_is_dropped(tmp_path):
    header = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")
    write(tmp_path, "glue/MRPC/dev.tsv", tsv(header, ("1", "7", "8", 'A "b".', "C d.")), encoding="utf-8-sig")
    assert get_task("glue/mrpc").load_split("validation", tmp_path).to_list() == [
        {"text_a": 'A "b".', "text_b": "C d.", "label": 1}]


def test_nli_label_names_map_to_hub_ids(tmp_path):
    header = ("index", "promptID", "pairID", "sentence1", "sentence2", "label1", "gold_label")
    rows = [(str(i), "0", "0", f"p{i}", f"h{i}", name, name) for i, name in enumerate(("neutral", "contradiction", "entailment"))]
    write(tmp_path, "glue/MNLI/dev_mismatched.tsv", tsv(header, *rows))
    data = get_task("glue/mnli").load_split("validation_mismatched", tmp_path)
    assert data["label"] == [1, 2, 0] and data["text_b"] == ["h0", "h1", "h2"]


def test_stsb_is_a_float_regression(tmp_path):
    header = ("index", "genre", "sentence1", "sentence2", "score")
    write(tmp_path, "glue/STS-B/train.tsv", tsv(header, ("0", "x", "a", "b", "3.800")))
    task = get_task("glue/stsb")
    assert (task.kind, task.num_labels) == ("regression", 1)
    assert task.load_split("train", tmp_path)["label"] == [pytest.approx(3.8)]


def test_glue_test_split_is_the_dev_set(tmp_path):
    write(tmp_path, "glue/SST-2/dev.tsv", tsv(("sentence", "label"), ("good .", "1")))
    task = get_task("glue/sst2")
    assert task.load_split("test", tmp_path).to_list() == task.load_split("validation", tmp_path).to_list()


def test_limit_keeps_the_first_rows_in_file_order(tmp_path):
    write(tmp_path, "glue/SST-2/train.tsv", tsv(("sentence", "label"), *((f"s{i}", str(i % 2)) for i in range(5))))
    assert get_task("glue/sst2").load_split("train", tmp_path, limit=3)["text_a"] == ["s0", "s1", "s2"]


# ---- bad input: each error names the file / row and the fix -------------------------------------


def test_data_dir_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        get_task("glue/rte").load_split("train", tmp_path / "nowhere")


def test_missing_file_names_the_path_and_layout(tmp_path):
    (tmp_path / "glue").mkdir()
    with pytest.raises(FileNotFoundError, match=r"glue/RTE/train\.tsv.*Expected layout"):
        get_task("glue/rte").load_split("train", tmp_path)


def test_family_folder_passed_as_data_dir_suggests_its_parent(tmp_path):
    write(tmp_path, "glue/RTE/train.tsv", tsv(("index", "sentence1", "sentence2", "label")))
    with pytest.raises(FileNotFoundError, match=rf"looks like the glue/ folder itself: pass its parent, data_dir='{tmp_path}'"):
        get_task("glue/rte").load_split("train", tmp_path / "glue")


def test_header_without_the_needed_column(tmp_path):
    write(tmp_path, "glue/RTE/train.tsv", tsv(("index", "premise", "hypothesis", "label"), ("0", "a", "b", "entailment")))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sentence1', 'sentence2'\]"):
        get_task("glue/rte").load_split("train", tmp_path)


def test_row_with_a_stray_tab_names_its_line(tmp_path):
    write(tmp_path, "glue/SST-2/train.tsv", tsv(("sentence", "label"), ("fine", "1"), ("a\tbroken", "0")))
    with pytest.raises(ValueError, match=r"train\.tsv line 3 has 3 tab-separated fields, expected 2"):
        get_task("glue/sst2").load_split("train", tmp_path)


@pytest.mark.parametrize("task, relative, rows, bad", [
    ("glue/cola", "glue/CoLA/train.tsv", [("gj04", "2", "", "s")], "'2'"),
    ("glue/rte", "glue/RTE/train.tsv", [("index", "sentence1", "sentence2", "label"), ("0", "a", "b", "neutral")], "'neutral'"),
    ("glue/stsb", "glue/STS-B/train.tsv", [("sentence1", "sentence2", "score"), ("a", "b", "7.5")], "'7.5'"),
])
def test_out_of_range_label_names_the_row(tmp_path, task, relative, rows, bad):
    write(tmp_path, relative, tsv(*rows))
    with pytest.raises(ValueError, match=rf"line {len(rows)}: .*{bad}"):
        get_task(task).load_split("train", tmp_path)


def test_commonsense_answer_of_another_task_is_rejected(tmp_path):
    write(tmp_path, "commonsense/piqa/test.json", json.dumps([cs_item("solution1"), cs_item("answer1")]))
    with pytest.raises(ValueError, match=r"test\.json item 1: answer 'answer1' is not a valid commonsense/piqa answer"):
        get_task("commonsense/piqa").load_split("test", tmp_path)


def test_commonsense_row_missing_a_field(tmp_path):
    item = cs_item("true")
    del item["output"]
    write(tmp_path, "commonsense/boolq/test.json", json.dumps([item]))
    with pytest.raises(ValueError, match=r"item 0 lacks string field\(s\) \['output'\]"):
        get_task("commonsense/boolq").load_split("test", tmp_path)


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ('{"a": 1}', "holds a JSON dict, expected a list")])
def test_commonsense_file_that_is_not_a_json_list(tmp_path, text, message):
    write(tmp_path, "commonsense/boolq/test.json", text)
    with pytest.raises(ValueError, match=message):
        get_task("commonsense/boolq").load_split("test", tmp_path)


def test_gsm8k_answer_without_final_number(tmp_path):
    lines = [{"question": "q", "answer": "3 + 4 = 7\n#### 7"}, {"question": "q", "answer": "no final line"}]
    write(tmp_path, "gsm8k/test.jsonl", "\n".join(json.dumps(x) for x in lines))
    with pytest.raises(ValueError, match=r"test\.jsonl line 2: the answer must end with '#### <number>'"):
        get_task("math/gsm8k").load_split("test", tmp_path)


def test_math_solution_without_boxed_answer(tmp_path):
    write(tmp_path, "math/math500_test.jsonl", json.dumps({"problem": "p", "solution": "it is 5"}))
    with pytest.raises(ValueError, match=r"line 1: the solution has no \\boxed"):
        get_task("math/math500").load_split("test", tmp_path)


def test_math500_train_needs_metamathqa(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metamathqa/MetaMathQA-395K\.json"):
        get_task("math/math500").load_split("train", tmp_path)


# ---- commonsense format and the LLM-Adapters hold-out ---------------------------------------------


def test_commonsense_row_is_alpaca_prompt_plus_output(tmp_path):
    write(tmp_path, "commonsense/boolq/test.json", json.dumps([cs_item("true", "Is it? Answer format: true/false")]))
    row = get_task("commonsense/boolq").load_split("test", tmp_path)[0]
    assert row["prompt"] == ("Below is an instruction that describes a task. Write a response that appropriately "
                             "completes the request.\n\n### Instruction:\nIs it? Answer format: true/false\n\n### Response:\n")
    assert (row["target"], row["answer"]) == ("the correct answer is true", "true")


def test_alpaca_prompt_with_input_uses_the_input_variant():
    prompt = alpaca_prompt("Do it.", "some context", "\n")
    assert "paired with an input" in prompt and prompt.endswith("### Input:\nsome context\n\n### Response:\n")


def test_validation_is_llm_adapters_seeded_hold_out(tmp_path):
    items = [cs_item("true" if i % 3 else "false", f"q{i}") for i in range(20)]
    write(tmp_path, "commonsense/boolq/train.json", json.dumps(items))
    task = CommonsenseTask(SPECS["boolq"], val_set_size=4)
    train = task.load_split("train", tmp_path)
    val = task.load_split("validation", tmp_path)
    # Independently: LLM-Adapters' finetune.py split of the same list.
    expected = datasets.Dataset.from_list(items).train_test_split(test_size=4, shuffle=True, seed=42)
    assert sorted(val["prompt"]) == sorted(alpaca_prompt(x, "", "\n") for x in expected["test"]["instruction"])
    assert len(train) == 16 and not set(train["prompt"]) & set(val["prompt"])


def test_too_small_training_file_for_the_hold_out(tmp_path):
    write(tmp_path, "commonsense/boolq/train.json", json.dumps([cs_item("true")] * 5))
    with pytest.raises(ValueError, match="too few to hold out the 120 validation rows"):
        get_task("commonsense/boolq").load_split("train", tmp_path)


def test_commonsense_all_trains_on_the_union_of_the_eight(tmp_path):
    for spec in SPECS.values():
        write(tmp_path, f"commonsense/{spec.folder}/train.json", json.dumps([cs_item(spec.choices[0])] * 2))
    answers = CommonsenseUnion(val_set_size=1).load_split("train", tmp_path)["answer"]
    assert len(answers) == 15 and set(answers) == {spec.choices[0] for spec in SPECS.values()}


def test_commonsense_all_prefers_the_170k_file(tmp_path):
    write(tmp_path, "commonsense/commonsense_170k.json", json.dumps([cs_item("ending2")] * 3))
    assert CommonsenseUnion(val_set_size=1).load_split("train", tmp_path)["answer"] == ["ending2"] * 2


def test_commonsense_all_without_training_files_names_what_is_missing(tmp_path):
    write(tmp_path, "commonsense/boolq/train.json", "[]")
    with pytest.raises(FileNotFoundError, match=r"missing train\.json for \['piqa', 'social_i_qa'.*commonsense_170k\.json"):
        get_task("commonsense/all").load_split("train", tmp_path)


def test_commonsense_all_is_evaluated_through_its_eight_tasks(tmp_path):
    task = get_task("commonsense/all")
    assert task.eval_tasks == tuple(f"commonsense/{key}" for key in SPECS)
    with pytest.raises(ValueError, match=r"no split 'test'.*eval_tasks"):
        task.load_split("test", tmp_path)


# ---- math rows ------------------------------------------------------------------------------------


def test_gsm8k_rows_use_metamath_prompts_and_answer_format(tmp_path):
    line = {"question": "Janet has 3 + 4 eggs?", "answer": "She has 3 + 4 = <<3+4=7>>7 eggs.\n#### 1,007"}
    write(tmp_path, "gsm8k/train.jsonl", json.dumps(line))
    write(tmp_path, "gsm8k/test.jsonl", json.dumps(line))
    task = get_task("math/gsm8k")
    train, test = task.load_split("train", tmp_path)[0], task.load_split("test", tmp_path)[0]
    assert train["prompt"].endswith("### Instruction:\nJanet has 3 + 4 eggs?\n\n### Response:")
    assert test["prompt"] == train["prompt"] + " Let's think step by step."
    assert train["target"] == " She has 3 + 4 = 7 eggs.\nThe answer is: 1007"
    assert train["answer"] == "1007"
    assert task.is_correct(task.extract_answer(train["target"]), train["answer"])


def test_math500_gold_is_the_last_boxed_answer(tmp_path):
    line = {"problem": "Half of 1?", "solution": "Try \\boxed{2}? No: $\\boxed{\\frac{1}{2}}$."}
    write(tmp_path, "math/math500_test.jsonl", json.dumps(line))
    row = get_task("math/math500").load_split("test", tmp_path)[0]
    assert row["answer"] == "\\frac{1}{2}"
    assert row["prompt"].endswith("### Response: Let's think step by step.")


def test_metamathqa_train_rows(tmp_path):
    item = {"query": "What is 2+2?", "response": "2+2 is 4.\nThe answer is: 4", "type": "GSM_Rephrased"}
    write(tmp_path, "metamathqa/MetaMathQA-395K.json", json.dumps([item]))
    row = get_task("math/math500").load_split("train", tmp_path)[0]
    assert row["prompt"].endswith("### Instruction:\nWhat is 2+2?\n\n### Response:")
    assert (row["target"], row["answer"]) == (" 2+2 is 4.\nThe answer is: 4", "4")


# ---- public sources (data_dir=None): which hub id / split / columns are read ----------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset with a recorder serving one given row."""
    calls, served = [], {}

    def load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        return datasets.Dataset.from_list([served["row"]])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, served


@pytest.mark.parametrize("task, split, row, call, expected", [
    ("glue/mnli", "test", {"premise": "p", "hypothesis": "h", "label": 2},
     ("nyu-mll/glue", "mnli", "validation_matched", None), {"text_a": "p", "text_b": "h", "label": 2}),
    ("glue/qqp", "train", {"question1": "a", "question2": "b", "label": 1},
     ("nyu-mll/glue", "qqp", "train", None), {"text_a": "a", "text_b": "b", "label": 1}),
    ("glue/cola", "validation", {"sentence": "s", "label": 0},
     ("nyu-mll/glue", "cola", "validation", None), {"text_a": "s", "text_b": None, "label": 0}),
    ("math/gsm8k", "test", {"question": "q", "answer": "1+1=2\n#### 2"},
     ("openai/gsm8k", "main", "test", None), {"answer": "2"}),
    ("math/math500", "test", {"problem": "p", "solution": "\\boxed{3}"},
     ("HuggingFaceH4/MATH-500", None, "test", None), {"answer": "3"}),
])
def test_hub_source_and_columns(fake_hub, task, split, row, call, expected):
    calls, served = fake_hub
    served["row"] = row
    loaded = get_task(task).load_split(split)[0]
    assert calls == [call]
    assert {k: loaded[k] for k in expected} == expected


def test_hub_test_labels_are_refused(fake_hub):
    _, served = fake_hub
    served["row"] = {"sentence": "s", "label": -1}
    with pytest.raises(ValueError, match="label -1 is out of range.*evaluate on dev"):
        get_task("glue/sst2").load_split("train")


def test_commonsense_public_source_is_llm_adapters_json_at_a_pinned_commit(fake_hub):
    calls, served = fake_hub
    served["row"] = cs_item("option2")
    assert get_task("commonsense/winogrande").load_split("test")["answer"] == ["option2"]
    (path, _, split, url), = calls
    assert (path, split) == ("json", "train")
    assert url.startswith("https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/8166572")
    assert url.endswith("/dataset/winogrande/test.json")
