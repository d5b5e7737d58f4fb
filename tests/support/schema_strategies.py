"""Hypothesis strategies read from a JSON Schema: instances it accepts, and JSON values of any shape.

hypothesis-jsonschema would do this, but 0.23.1 (the newest) fails on object schemas with the
Hypothesis installed here ("'many' object has no attribute 'more'"), so this covers the keywords
worker/schemas uses: type (and lists of types), const, enum, properties, required,
additionalProperties false, items, minItems, minLength, maxLength, pattern, minimum, maximum,
$ref into $defs, anyOf, oneOf (a branch's `required` and `properties` join the object's), and
anything else (allOf, if/then, not) by filtering with the real validator. A keyword it does not
know fails loudly, so a schema cannot quietly outgrow its generator.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from jsonschema import Draft202012Validator

KNOWN = frozenset({
    "$schema", "$id", "$defs", "title", "description", "examples", "default", "format", "type", "const",
    "enum", "properties", "required", "additionalProperties", "items", "minItems", "minLength", "maxLength",
    "pattern", "minimum", "maximum", "$ref", "anyOf", "oneOf", "allOf", "if", "then", "else", "not",
})
INT64 = (-(2**63), 2**63 - 1)
ABSENT = object()  # an optional property left out

# Any JSON value, biased to what a validator finds hard: numbers at type edges, phone-like and
# whitespace strings, and nesting.
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 1.0, 2.0, 2**63, -(2**63) - 1, "", " ", "\n", "0", "1", "true", "41793026727",
                     "+41793026727", "41793026727\n", "0f", "2026-12-01T09:30:00Z"]),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


class SchemaStrategies:
    """Strategies for one schema document (its `$defs` resolve against it)."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.validator = Draft202012Validator(root)

    def valid(self) -> st.SearchStrategy[Any]:
        """Instances the whole schema accepts."""
        return self.of(self.root).filter(self.validator.is_valid)

    def of(self, node: dict[str, Any]) -> st.SearchStrategy[Any]:
        """Instances `node` (a part of the schema) accepts."""
        unknown = set(node) - KNOWN
        if unknown:
            raise ValueError(f"schema keywords this generator does not know: {sorted(unknown)}")
        # The node's own validator (with the root's $defs, for its $refs) filters what the
        # keywords generated only roughly: allOf, if/then, not, a pattern and a length together.
        check = Draft202012Validator({**node, "$defs": self.root.get("$defs", {})})
        return self._of(node).filter(check.is_valid)

    def _of(self, node: dict[str, Any]) -> st.SearchStrategy[Any]:
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/$defs/")
            return self.of(self.root["$defs"][name])
        if "const" in node:
            return st.just(node["const"])
        if "enum" in node:
            return st.sampled_from(node["enum"])
        if "anyOf" in node:
            return st.one_of([self.of(branch) for branch in node["anyOf"]])
        kinds = node.get("type")
        if isinstance(kinds, list):
            return st.one_of([self._typed({**node, "type": kind}) for kind in kinds])
        return self._typed(node)

    def _typed(self, node: dict[str, Any]) -> st.SearchStrategy[Any]:
        kind = node.get("type")
        if kind == "null":
            return st.none()
        if kind == "boolean":
            return st.booleans()
        if kind == "integer":
            return st.integers(node.get("minimum", INT64[0] - 10), node.get("maximum", INT64[1] + 10))
        if kind == "string":
            return self._string(node)
        if kind == "array":
            return st.lists(self.of(node["items"]), min_size=node.get("minItems", 0), max_size=4)
        if kind == "object":
            return self._object(node)
        raise ValueError(f"a schema node without a type this generator knows: {node}")

    def _string(self, node: dict[str, Any]) -> st.SearchStrategy[str]:
        low, high = node.get("minLength", 0), node.get("maxLength")
        if "pattern" in node:
            strings = st.from_regex(node["pattern"])
        else:
            strings = st.text(min_size=low, max_size=min(high or 40, 40))
        return strings.filter(lambda s: low <= len(s) and (high is None or len(s) <= high))

    def _object(self, node: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        branches = node.get("oneOf") or [{}]
        return st.one_of([self._members(node, branch) for branch in branches])

    def _members(self, node: dict[str, Any], branch: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        # Static strategies only (no flatmap): Hypothesis validates a strategy built per draw again
        # on every draw, which made generation ten times slower.
        properties = dict(node.get("properties", {}))
        for name, extra in branch.get("properties", {}).items():
            properties[name] = {"allOf": [properties.get(name, {}), extra]}
        required = set(node.get("required", ())) | set(branch.get("required", ()))
        members = {name: self._member(schema) if name in required
                   else st.one_of(st.just(ABSENT), self._member(schema)) for name, schema in properties.items()}
        extra: st.SearchStrategy[dict[str, Any]] = st.just({})
        if node.get("additionalProperties", True) is not False:
            extra = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in properties), json_values, max_size=2)
        return st.tuples(st.fixed_dictionaries(members), extra).map(
            lambda parts: {**parts[1], **{k: v for k, v in parts[0].items() if v is not ABSENT}})

    def _member(self, node: dict[str, Any]) -> st.SearchStrategy[Any]:
        """A property's instances; a oneOf branch's narrowing comes as allOf [the property, the branch's]."""
        if set(node) == {"allOf"}:
            first, *rest = node["allOf"]
            checks = [Draft202012Validator({**r, "$defs": self.root.get("$defs", {})}) for r in rest]
            return self.of(first).filter(lambda v: all(c.is_valid(v) for c in checks))
        return self.of(node)
