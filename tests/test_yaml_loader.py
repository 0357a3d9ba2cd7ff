"""`load_unique_keys`: the YAML loader of manifests and compose files."""

from __future__ import annotations

import pytest
import yaml

from agogosml_cli.yaml_loader import (
    DuplicateKeyError,
    load_document,
    load_unique_keys,
    scalar_node_at,
)


def test_repeated_key_names_both_lines() -> None:
    with pytest.raises(DuplicateKeyError) as caught:
        load_unique_keys("a: 1\nb:\n  c: 2\na: 3\n")

    assert caught.value.key == "a"
    assert caught.value.first_line == 1
    assert caught.value.line == 4
    assert "the key 'a' appears twice in one mapping, on lines 1 and 4" in str(
        caught.value
    )


def test_repeated_key_in_flow_mapping() -> None:
    with pytest.raises(DuplicateKeyError, match="on lines 1 and 1"):
        load_unique_keys("{a: 1, a: 2}\n")


def test_merge_key_values_overridable() -> None:
    data = load_unique_keys("base: &base {a: 1, c: 2}\nd:\n  <<: *base\n  a: 3\n")

    assert data["d"] == {"a": 3, "c": 2}


def test_same_key_in_two_mappings() -> None:
    assert load_unique_keys("x: {a: 1}\ny: {a: 2}\n") == {"x": {"a": 1}, "y": {"a": 2}}


def test_invalid_yaml_still_yaml_error() -> None:
    with pytest.raises(yaml.YAMLError):
        load_unique_keys("a: [unclosed\n")


def test_load_document_returns_nodes() -> None:
    data, document = load_document("a:\n  b: [x, yes]\n")

    node = scalar_node_at(document, ["a", "b", 1])
    assert data == {"a": {"b": ["x", True]}}
    assert node is not None
    assert node.value == "yes"
    assert node.start_mark.line == 1


def test_load_document_rejects_repeated_key() -> None:
    with pytest.raises(DuplicateKeyError):
        load_document("a: 1\na: 2\n")


def test_empty_document_has_no_node() -> None:
    assert load_document("") == (None, None)


def test_scalar_node_at_finds_merged_key() -> None:
    _, document = load_document("base: &base {a: on, c: 2}\nd:\n  <<: *base\n  c: 3\n")

    merged = scalar_node_at(document, ["d", "a"])
    overridden = scalar_node_at(document, ["d", "c"])
    assert merged is not None
    assert merged.value == "on"
    assert overridden is not None
    assert overridden.value == "3"


@pytest.mark.parametrize(
    "path",
    [["missing"], ["a", 5], ["a", "b"], ["a"], ["a", 0, "c"]],
)
def test_scalar_node_at_missing_path(path: list[str | int]) -> None:
    _, document = load_document("a: [x]\n")

    assert scalar_node_at(document, path) is None
