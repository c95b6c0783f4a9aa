"""The one name→thing table (lrzoo/registry_table.py) behind every registry: duplicates refused, an unknown name
answered with the closest known one as a UserError, in every table that uses it."""

from __future__ import annotations

import copy
import pickle

import pytest

import lrzoo
from lrzoo.errors import UserError
from lrzoo.registry_table import Table


def test_a_table_adds_looks_up_and_refuses_a_taken_name():
    table = Table("widget", hint="Add one with add_widget.")
    assert table.add("bolt", 1) == 1 and table.add("nut", 2) == 2
    assert table.lookup("nut") == 2 and table.names() == ["bolt", "nut"] and dict(table) == {"bolt": 1, "nut": 2}
    with pytest.raises(ValueError, match="A widget named 'bolt' is already registered"):
        table.add("bolt", 3)
    assert table.add("bolt", 3, replace=True) == 3
    with pytest.raises(UserError, match=r"^Unknown widget 'blot'\. Did you mean 'bolt'\? Known widgets: bolt, nut\. "
                                        r"Add one with add_widget\.$"):
        table.lookup("blot")


def test_a_table_survives_copy_and_pickle():
    table = Table("widget", entries={"bolt": 1})
    for clone in (copy.deepcopy(table), pickle.loads(pickle.dumps(table))):
        assert dict(clone) == {"bolt": 1} and clone.kind == "widget"


@pytest.mark.parametrize("lookup, typo, guess", [
    (lrzoo.get_adapter, "lorra", "lora"),
    (lambda name: __import__("lrzoo.optimizers", fromlist=["get_optimizer"]).get_optimizer(name), "galor", "galore"),
    (lambda name: __import__("lrzoo.tasks", fromlist=["get_task"]).get_task(name), "glue/sst3", "glue/sst2"),
    (lambda name: __import__("lrzoo.tasks.metrics", fromlist=["compute"]).compute([name], [1], [1]), "acuracy",
     "accuracy"),
    (lambda name: __import__("lrzoo.procedure", fromlist=["PROCEDURES"]).PROCEDURES.lookup(name), "rellora", "relora"),
    (lambda name: __import__("lrzoo.train.callbacks", fromlist=["make_logger"]).make_logger(name, ".", False), "cvs",
     "csv"),
])
def test_every_table_answers_a_typo_with_the_closest_name(lookup, typo, guess):
    with pytest.raises(UserError, match=f"Did you mean {guess!r}"):
        lookup(typo)
