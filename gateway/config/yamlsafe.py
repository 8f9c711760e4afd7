"""The one YAML reader: bounded in file size, in nodes and in expanded size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.config.limits import YAML_MAX_BYTES, file_problem
from gateway.config.problems import Problem

# Bounds on what one YAML file may cost (configs and profiles are a few kB): the size
# of the file (YAML_MAX_BYTES), and the number of nodes, also once aliases are expanded. A few hundred bytes
# of nested aliases (a "billion laughs") otherwise become 10^8 list items that every
# later step (validation, error messages, logs) walks: minutes and gigabytes.
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document of more than MAX_YAML_NODES nodes, as
    written (counted while composing) or with its aliases expanded (before constructing
    any Python object from it)."""

    _nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            msg = f"the document has more than {MAX_YAML_NODES:,} values"
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, msg, mark)
        return super().compose_node(parent, index)

    def construct_document(self, node: yaml.Node) -> Any:
        n = expanded_size(node)
        if n > MAX_YAML_NODES:
            mark = node.start_mark
            msg = (f"the document expands to more than {MAX_YAML_NODES:,} values once its "
                   "aliases (*name) are resolved")
            raise yaml.constructor.ConstructorError(None, None, msg, mark)
        return super().construct_document(node)


def expanded_size(root: yaml.Node, stop: int = MAX_YAML_NODES) -> int:
    """Number of nodes with every alias expanded, counting up to just past `stop`.

    An alias is the same node object reached twice: sizes are memoized per node, so
    this is linear in the file however large the expansion is."""
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [x for kv in node.value for x in kv]
        else:
            size[id(node)] = 1
            continue
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
            continue
        size[id(node)] = min(stop + 1, 1 + sum(size.get(id(c), 1) for c in children))
    return size[id(root)]


def read_yaml(path: Path, problems: list[Problem]) -> Any:
    """The one YAML reader (config, profiles, simulator scenarios), bounded in file size
    (YAML_MAX_BYTES), in nodes and in expanded size (MAX_YAML_NODES)."""
    if (prob := file_problem(path, YAML_MAX_BYTES)) is not None:
        problems.append(Problem(str(path), "-", prob,
                                "point it at a YAML file (a regular file, not a device)"))
        return None
    try:
        with path.open("rb") as f:
            raw = f.read(YAML_MAX_BYTES + 1)  # a file that grew since: still bounded
    except FileNotFoundError:
        problems.append(Problem(str(path), "-", "file not found",
                                "check the path (relative paths are from the config file)"))
        return None
    except OSError as e:
        problems.append(Problem(str(path), "-", f"cannot read: {e.strerror or e}"))
        return None
    if len(raw) > YAML_MAX_BYTES:
        problems.append(Problem(str(path), "-", f"more than the {YAML_MAX_BYTES} bytes allowed",
                                "check the path; real configs and profiles are a few kB"))
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        problems.append(Problem(str(path), f"line {line}", f"not UTF-8 text ({e.reason} at "
                                f"byte {e.start})", "save the file as UTF-8"))
        return None
    try:
        data = yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass
        _no_surrogates(path, data, problems)
        return data
    except RecursionError:
        problems.append(Problem(str(path), "-", "nested too deeply",
                                "a config or profile needs a few levels of nesting, not hundreds"))
        return None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "-"
        problem = getattr(e, "problem", None) or e
        fix = ("write the values out, or use fewer nested aliases" if "aliases" in str(problem)
               else "split the file, or check the path" if "values" in str(problem)
               else "fix the indentation or quoting at that spot")
        problems.append(Problem(str(path), where, f"invalid YAML: {problem}", fix))
        return None


def _no_surrogates(path: Path, data: Any, problems: list[Problem]) -> None:
    """A "\\udc80" escape in YAML gives a str that no UTF-8 encoder takes: MQTT topics,
    payloads and logs would fail at run time. Walk the tree once (shared nodes once)."""
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:
        key, node = todo.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                problems.append(Problem(str(path), key or "(top level)",
                                        "text with a lone surrogate escape (\\ud800-\\udfff) "
                                        "is not valid UTF-8", "remove the \\u escape"))
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            for k, v in node.items():
                sub = f"{key}.{k}" if key else str(k)
                todo.append((sub, k))
                todo.append((sub, v))
        elif isinstance(node, list):
            todo.extend((f"{key}[{i}]", v) for i, v in enumerate(node))

