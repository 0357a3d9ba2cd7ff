"""Load YAML that agogosml reads from users, rejecting a key repeated in one mapping.

PyYAML's SafeLoader keeps the last value of a repeated key and drops the
others without a message, so a second ``name:`` in a manifest or a compose
file would silently replace the first. `load_unique_keys` raises
`DuplicateKeyError` instead, as Docker Compose does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"
_STRING_TAG = "tag:yaml.org,2002:str"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping contains a key twice; the message names it and both lines.

    Attributes:
        key: The repeated key.
        first_line: The 1-based line of its first occurrence.
        line: The 1-based line of its second occurrence.
    """

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(
            f"the key {key!r} appears twice in one mapping, on lines {first_line} "
            f"and {line}. Remove one of them."
        )
        self.key = key
        self.first_line = first_line
        self.line = line


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that raises `DuplicateKeyError` for a key repeated in a mapping.

    Keys that a merge key (``<<: *anchor``) brings in may be overridden, as
    YAML allows, because they are not in the mapping node itself.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        """Check the keys for repeats, then construct the mapping as SafeLoader does."""
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first_line = first_lines.get(key)
                first_lines.setdefault(key, line)
            except TypeError:
                # An unhashable key, which SafeLoader itself rejects below.
                continue
            if first_line is not None:
                raise DuplicateKeyError(key, first_line, line)
        return super().construct_mapping(node, deep)


def load_unique_keys(text: str, name: str = "") -> Any:
    """Parse one YAML document safely, rejecting repeated keys.

    `name`, when given, names the text in syntax errors.

    Raises:
        DuplicateKeyError: A mapping contains a key twice.
        yaml.YAMLError: The text is not valid YAML.
    """
    data, _ = load_document(text, name)
    return data


def load_document(text: str, name: str = "") -> tuple[Any, yaml.Node | None]:
    """Parse one YAML document like `load_unique_keys`; also return its node tree.

    The nodes keep each scalar's text and line, which error messages about
    the parsed values can quote. SafeLoader resolves merge keys in the tree,
    so the merged keys are found there too. The node is None for an empty
    document. `name`, when given, names the text in syntax errors in place of
    ``<unicode string>``.

    Raises:
        DuplicateKeyError: A mapping contains a key twice.
        yaml.YAMLError: The text is not valid YAML.
    """
    loader = UniqueKeyLoader(text)
    if name:
        loader.name = name
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


def scalar_node_at(
    node: yaml.Node | None, path: Sequence[str | int]
) -> yaml.ScalarNode | None:
    """Return the scalar at `path` (mapping keys and list indexes), or None.

    Of a key that appears more than once after merging, the last one counts,
    as in the parsed data.
    """
    for part in path:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            values = [
                value
                for key, value in node.value
                if isinstance(key, yaml.ScalarNode)
                and key.tag == _STRING_TAG
                and key.value == part
            ]
            node = values[-1] if values else None
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if 0 <= part < len(node.value) else None
        else:
            return None
    return node if isinstance(node, yaml.ScalarNode) else None
