"""The Alpaca prompt template (Taori et al. 2023) used by LLM-Adapters (commonsense) and MetaMath (math),
and the matching way to cut a generation down to the model's response."""

from __future__ import annotations

RESPONSE_MARK = "### Response:"
_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_PREAMBLE_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                        "context. Write a response that appropriately completes the request.")


def alpaca_prompt(instruction: str, input: str = "", response_lead: str = "") -> str:
    """The Alpaca prompt up to and including ``### Response:`` followed by ``response_lead``.

    LLM-Adapters trains on ``prompt + "\\n" + output`` (response_lead ``"\\n"``); MetaMath evaluates
    with ``" Let's think step by step."``. The with-input variant is used when ``input`` is non-empty.
    """
    if input:
        return (f"{_PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                f"{RESPONSE_MARK}{response_lead}")
    return f"{_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n{RESPONSE_MARK}{response_lead}"


def response_text(generated: str) -> str:
    """The response part of a generation: the text after the first ``### Response:`` up to the next one
    (LLM-Adapters' ``split("### Response:")[1]``), or all of ``generated`` when it holds only the
    continuation (no marker)."""
    parts = generated.split(RESPONSE_MARK)
    return parts[1] if len(parts) > 1 else generated
