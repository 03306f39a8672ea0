"""The channel message catalogue (``wire/messages.py``): declared once, used everywhere, documented from it."""

from __future__ import annotations

import ast

import pytest

from cluster_server.wire import messages

from ..conftest import ROOT

PACKAGE = ROOT / "cluster_server"


def test_architecture_page_has_the_catalogue_table() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert messages.BEGIN in page and messages.END in page
    generated = page[page.index(messages.BEGIN) + len(messages.BEGIN) + 1 : page.index(messages.END)]
    assert generated == messages.markdown(), (
        "docs/architecture.md's message tables differ from wire/messages.py: run `python -m cluster_server.cli.docs`"
    )
    for m in messages.CATALOGUE:
        assert f"| `{m.name}` | {m.direction} |" in generated


def test_the_table_follows_a_change_to_the_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    extra = messages.MessageType("worker", "bogus", "worker", "primary", "a message nobody sends")
    monkeypatch.setattr(messages, "CATALOGUE", (*messages.CATALOGUE, extra))
    assert messages.render_between_markers(page) != page
    assert "| `bogus` | worker -> primary |" in messages.markdown()
    with pytest.raises(ValueError, match="no message-table markers"):
        messages.render_between_markers("no markers")


def test_cli_prints_the_markdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert messages.main(["--markdown"]) == 0
    assert capsys.readouterr().out == messages.markdown()
    assert messages.main([]) == 2


def test_catalogue_is_consistent() -> None:
    ends = {ch.name: {end for end, _module in ch.ends} for ch in messages.CHANNELS}
    seen = set()
    for m in messages.CATALOGUE:
        assert m.channel in ends, m
        assert {m.sender, m.receiver} == ends[m.channel], m
        key = (m.channel, m.name, m.sender)
        assert key not in seen, f"{key} declared twice"
        seen.add(key)
        assert len({f.name for f in m.fields}) == len(m.fields), m
    constants = {
        v for k, v in vars(messages).items() if k.isupper() and isinstance(v, str) and k not in ("BEGIN", "END")
    }
    assert constants == messages.names(), "every type-name constant is catalogued, and only those"


def _is_get_t(node: ast.AST) -> bool:
    """``<something>.get("t")``: reading a message's type."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value == "t"
    )


def _literal_strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [s for elt in node.elts for s in _literal_strings(elt)]
    return []


class _BareTypes(ast.NodeVisitor):
    """Finds message types written as string literals: ``{"t": "x"}``, ``msg.get("t") == "x"``
    (also through a variable of the same function assigned from ``msg.get("t")``), ``handlers["x"]``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.found: list[str] = []
        self.kind_names: list[set[str]] = [set()]

    def _hit(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{self.name}:{getattr(node, 'lineno', '?')} {what}")

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        assigned = {
            target.id
            for sub in ast.walk(node)
            if isinstance(sub, ast.Assign) and _is_get_t(sub.value)
            for target in sub.targets
            if isinstance(target, ast.Name)
        }
        self.kind_names.append(assigned)
        self.generic_visit(node)
        self.kind_names.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and key.value == "t":
                for text in _literal_strings(value):
                    self._hit(node, f"{{'t': {text!r}}}")
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        sides = [node.left, *node.comparators]
        kinds = self.kind_names[-1]
        if any(_is_get_t(s) or (isinstance(s, ast.Name) and s.id in kinds) for s in sides):
            for s in sides:
                for text in _literal_strings(s):
                    self._hit(node, f"compared with {text!r}")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.value, ast.Attribute) and node.value.attr == "handlers":
            for text in _literal_strings(node.slice):
                self._hit(node, f"handlers[{text!r}]")
        self.generic_visit(node)


def _bare_type_strings(source: str, name: str) -> list[str]:
    finder = _BareTypes(name)
    finder.visit(ast.parse(source))
    return finder.found


def test_no_message_type_is_spelled_outside_the_catalogue() -> None:
    found = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        for hit in _bare_type_strings(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert found == [], "use the names in cluster_server/wire/messages.py:\n" + "\n".join(found)


def test_the_check_finds_bare_type_strings() -> None:
    sample = (
        "def f(msg, server):\n"
        "    kind = msg.get('t')\n"
        "    if kind == 'ready' or msg.get('t') in ('hb', 'ack'):\n"
        "        server.handlers['conn'] = f\n"
        "    return {'t': 'msg', 'state': 'ready'} if kind == READY else None\n"
        "def g(kind):\n"
        "    return kind == 'preload'  # another function's 'kind': not a message type\n"
    )
    hits = sorted(h.split(" ", 1)[1] for h in _bare_type_strings(sample, "sample.py"))
    assert hits == sorted(
        ["compared with 'ready'", "compared with 'hb'", "compared with 'ack'", "handlers['conn']", "{'t': 'msg'}"]
    )
