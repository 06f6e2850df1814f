"""Compare rows: a pattern may name its own sparsity ('structured=0.25'), so structured 25%
and 50% rows sit side by side."""

from __future__ import annotations

import pytest

from gradprune.config import ParamError, params_from_dict
from gradprune.config.schema import split_row_pattern
from tasks.compare import row_mask_params


def test_a_row_pattern_may_name_its_sparsity():
    assert split_row_pattern("structured=0.25", "k") == ("structured", 0.25)
    assert split_row_pattern("unstructured=0.6", "k") == ("unstructured", 0.6)
    assert split_row_pattern("2:4", "k") == ("2:4", None)
    params = params_from_dict({"masks": {"criterion": "wanda"},
                               "compare": {"criteria": ["wanda"],
                                           "patterns": ["structured=0.25", "structured", "2:4"]}})
    quarter = row_mask_params(params, "wanda", "structured=0.25")
    assert (quarter.pattern, quarter.sparsity) == ("structured", 0.25)
    half = row_mask_params(params, "wanda", "structured")
    assert (half.pattern, half.sparsity) == ("structured", 0.5)
    assert row_mask_params(params, "wanda", "2:4").sparsity == 0.5


@pytest.mark.parametrize("pattern, message", [
    ("structured=1.5", "must be a number in [0, 1)"),
    ("structured=half", "must be a number in [0, 1)"),
    ("2:4=0.5", "an N:M pattern fixes its sparsity"),
    ("blocks=0.5", "allowed: 'unstructured', 'N:M'"),
])
def test_bad_row_patterns_name_the_key(pattern, message):
    with pytest.raises(ParamError) as info:
        params_from_dict({"compare": {"criteria": ["wanda"], "patterns": [pattern]}})
    assert info.value.key == "compare.patterns[0]"
    assert message in str(info.value)


def test_a_matrix_may_pair_sparsegpt_with_structured_rows_which_record_why_they_are_empty():
    from gradprune.config.schema import row_not_applicable
    from tasks.report import report_table

    params_from_dict({"compare": {"criteria": ["sparsegpt", "wanda"],
                                  "patterns": ["structured=0.25", "2:4"]}})
    assert row_not_applicable("sparsegpt", "structured=0.25") == "sparsegpt has no structured form"
    assert row_not_applicable("sparsegpt", "2:4") is None
    assert row_not_applicable("wanda", "structured") is None
    row = {"perplexity_test": 10.0, "tasks": {}, "sparsity": 0.0, "parameters": 1, "nonzero": 1,
           "bytes": {"dense_export": 1e6, "sparse_export": 1e6}}
    skipped = {"criterion": "sparsegpt", "pattern": "structured",
               "not_applicable": "sparsegpt has no structured form"}
    _, body = report_table((), {"dense": row}, [skipped], {})
    assert [r[0] for r in body] == ["dense"]
