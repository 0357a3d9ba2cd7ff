"""`load_unique_keys`: the YAML loader of manifests and compose files."""

from __future__ import annotations

import pytest
import yaml

from agogosml_cli.yaml_loader import DuplicateKeyError, load_unique_keys


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
