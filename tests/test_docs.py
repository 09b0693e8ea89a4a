"""The documentation matches the code: docstrings with examples, and the README's API section.

Checked against ``inspect.signature``, so adding, renaming or removing an argument without
updating the docs fails here:

- every public name (``__all__`` of the modules in ``PUBLIC_MODULES``) has a docstring with an
  example (``Example::`` or ``>>>``), and its ``Args:`` section names exactly its parameters;
- every public method and property of ``LocalSGDOptimizer`` has a docstring;
- in the README's ``## API`` section, the ``LocalSGDOptimizer(...)`` signature line and the
  argument table below it list exactly the real parameters, in order, with the real kinds
  (keyword-only after ``*``) and defaults; any other ``public_name(...)`` line there is held to
  the same rules; and every ``opt.<name>`` it mentions exists.

And the pages hold together: every relative link in README.md and docs/*.md reaches a file that
exists (and a heading there, for ``#anchor`` links), every docs page is linked from the README,
and the README stays a short front page.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import inspect
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from local_sgd_optim import LocalSGDOptimizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PUBLIC_MODULES = [
    "local_sgd_optim",
    "local_sgd_optim.accelerate",
    "local_sgd_optim.checkpoint",
    "local_sgd_optim.lightning",
    "local_sgd_optim.schedules",
    "local_sgd_optim.transformers",
]
_EMPTY = inspect.Parameter.empty
_OPTIMIZER_ATTRIBUTES = ("param_groups", "state", "defaults")


def _public_objects() -> dict[str, Any]:
    """``module.name`` -> object, for every documented name (``__version__`` is data)."""
    found: dict[str, Any] = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found[f"{module_name}.{name}"] = obj
    return found


def _has_example(doc: str | None) -> bool:
    return doc is not None and ("Example::" in doc or ">>>" in doc)


def _documented_args(doc: str) -> list[str] | None:
    """The names in a Google-style ``Args:`` section (``*args`` as ``*args``), or None."""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip())
    names = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break  # the next section
        entry = re.match(r"(\*{0,2}\w+)(?: \([^)]*\))?:", line[indent:].strip())
        if entry and len(line) - len(line.lstrip()) == indent + 4:
            names.append(entry.group(1))
    return names


def _parameter_names(obj: Any) -> list[str]:
    names = []
    for p in inspect.signature(obj).parameters.values():
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        names.append(prefix + p.name)
    return names


@pytest.mark.parametrize("qualname", sorted(_public_objects()))
def test_public_name_has_docstring_with_example(qualname: str) -> None:
    obj = _public_objects()[qualname]
    assert _has_example(inspect.getdoc(obj)), f"{qualname} needs a docstring with an Example::"


@pytest.mark.parametrize("qualname", sorted(_public_objects()))
def test_docstring_args_match_signature(qualname: str) -> None:
    obj = _public_objects()[qualname]
    documented = _documented_args(inspect.getdoc(obj) or "")
    real = _parameter_names(obj)
    if documented is None:
        assert not real, f"{qualname} takes {real} but its docstring has no Args: section"
        return
    assert not set(documented) - set(real), (
        f"{qualname}'s docstring documents arguments that do not exist: "
        f"{sorted(set(documented) - set(real))}"
    )
    assert not set(real) - set(documented), (
        f"{qualname}'s docstring does not document {sorted(set(real) - set(documented))}"
    )


def _public_members(cls: type) -> dict[str, Any]:
    """Methods and properties that ``cls`` defines itself and that do not start with ``_``."""
    return {name: value for name, value in vars(cls).items() if not name.startswith("_")}


def test_every_public_member_of_the_optimizer_has_a_docstring() -> None:
    class_doc = inspect.getdoc(LocalSGDOptimizer) or ""
    assert _has_example(class_doc)
    members = _public_members(LocalSGDOptimizer)
    assert {"step", "zero_grad", "average", "close", "state_dict", "micro_steps"} <= set(members)
    undocumented = []
    for name, value in members.items():
        function = value.fget if isinstance(value, property) else value
        if (getattr(function, "__doc__", None) or "").strip():
            continue
        # torch.optim.Optimizer's own attributes, re-exposed as properties that return the base
        # optimizer's objects: the class docstring must say so by name.
        if name in _OPTIMIZER_ATTRIBUTES and f"``{name}``" in class_doc:
            continue
        undocumented.append(name)
    assert not undocumented, f"LocalSGDOptimizer members without a docstring: {undocumented}"


# --- the README's API section ------------------------------------------------------------


def _api_section() -> str:
    text = README.read_text()
    match = re.search(r"^## API\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no '## API' section"
    return match.group(1)


def _signature_lines(section: str) -> list[tuple[str, str, int]]:
    """(name, parameter text, end offset) of every ```name(...)``` code span naming a public
    callable."""
    public = {qualname.rsplit(".", 1)[1] for qualname in _public_objects()}
    spans = []
    for match in re.finditer(r"`(\w+)\(([^`]*)\)`", section):
        if match.group(1) in public:
            spans.append((match.group(1), " ".join(match.group(2).split()), match.end()))
    return spans


def _parse_parameters(text: str) -> list[tuple[str, str, ast.expr | None]]:
    """(name, kind, default node) for a parameter list written as in a ``def``."""
    function = ast.parse(f"def f({text}): pass").body[0]
    assert isinstance(function, ast.FunctionDef)
    args = function.args
    positional = args.posonlyargs + args.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += list(args.defaults)
    parsed = [(a.arg, "positional", d) for a, d in zip(positional, defaults)]
    if args.vararg:
        parsed.append(("*" + args.vararg.arg, "var", None))
    parsed += [(a.arg, "keyword", d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        parsed.append(("**" + args.kwarg.arg, "var", None))
    return parsed


def _kind(p: inspect.Parameter) -> str:
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        return "var"
    return "keyword" if p.kind is p.KEYWORD_ONLY else "positional"


def _default_matches(node: ast.expr, value: Any) -> bool:
    try:
        written = ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node) == repr(value)  # e.g. torch.float16
    if isinstance(value, float) and type(written) is int:
        return written == value  # ``25`` for 25.0
    return type(written) is type(value) and written == value


def _table_after(section: str, offset: int) -> list[str] | None:
    """First-column names of the ``| argument | ... |`` table that follows ``offset``, if the
    next block after the signature is one."""
    rest = section[offset:].lstrip(" \n")
    lines = rest.splitlines()
    if not lines or not re.match(r"\|\s*argument\s*\|", lines[0]):
        return None
    names = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cell = line.split("|")[1].strip()
        names.append(cell.strip("`"))
    return names


def _check_signature(name: str, text: str, offset: int, section: str) -> list[str]:
    obj = next(o for q, o in _public_objects().items() if q.endswith("." + name))
    real = {
        ("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name: p
        for p in inspect.signature(obj).parameters.values()
    }
    documented = _parse_parameters(text)
    problems = []
    missing = [n for n in documented if n[0] not in real]
    if missing:
        problems.append(f"documents arguments that do not exist: {[n[0] for n in missing]}")
    undocumented = [n for n in real if n not in [d[0] for d in documented]]
    if undocumented:
        problems.append(f"does not document {undocumented}")
    if not missing and not undocumented and [d[0] for d in documented] != list(real):
        problems.append(f"lists the arguments as {[d[0] for d in documented]}, not {list(real)}")
    for arg, kind, default in documented:
        p = real.get(arg)
        if p is None:
            continue
        if kind != _kind(p):
            problems.append(f"shows {arg} as {kind}, but it is {_kind(p)}")
        if default is None and p.default is not _EMPTY and kind != "var":
            problems.append(f"shows {arg} without its default {p.default!r}")
        elif default is not None and p.default is _EMPTY:
            problems.append(f"gives {arg} a default ({ast.unparse(default)}) it does not have")
        elif default is not None and not _default_matches(default, p.default):
            problems.append(f"gives {arg} the default {ast.unparse(default)}, not {p.default!r}")
    table = _table_after(section, offset)
    if table is not None and table != list(real):
        problems.append(f"has an argument table listing {table}, not {list(real)}")
    if name == "LocalSGDOptimizer" and table is None:
        problems.append("has no '| argument | meaning |' table right after the signature")
    return [f"README's `{name}(...)` {problem}" for problem in problems]


def test_readme_api_signature_and_table_match_the_code() -> None:
    section = _api_section()
    signatures = _signature_lines(section)
    assert "LocalSGDOptimizer" in [s[0] for s in signatures], (
        "README's API section has no `LocalSGDOptimizer(...)` signature line"
    )
    problems = [
        p for name, text, end in signatures for p in _check_signature(name, text, end, section)
    ]
    assert not problems, "\n".join(problems)


def test_readme_api_mentions_only_existing_attributes() -> None:
    mentioned = set(re.findall(r"`opt\.(\w+)", _api_section()))
    assert {"micro_steps", "average", "base_optimizer"} <= mentioned
    missing = sorted(name for name in mentioned if not hasattr(LocalSGDOptimizer, name))
    assert not missing, f"README's API section mentions opt.{missing}, which do not exist"


def test_the_checks_catch_a_wrong_signature() -> None:
    """The checker itself: a made-up argument, a dropped one, a wrong default and a wrong kind
    are each reported."""
    good = "base_optimizer, model, period, *, " + ", ".join(
        f"{p.name}={p.default!r}"
        for p in inspect.signature(LocalSGDOptimizer).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    )
    table = "\n\n| argument | meaning |\n|---|---|\n" + "".join(
        f"| `{n}` | x |\n" for n in inspect.signature(LocalSGDOptimizer).parameters
    )

    def problems(params: str) -> list[str]:
        section = f"`LocalSGDOptimizer({params})`{table}"
        return _check_signature("LocalSGDOptimizer", params, section.index(")`") + 2, section)

    assert problems(good) == []
    assert "do not exist: ['momentum']" in problems(good + ", momentum=0.9")[0]
    assert "does not document ['period']" in problems(good.replace("period, ", ""))[0]
    assert "not True" in problems(good.replace("enabled=True", "enabled=False"))[0]
    assert "as positional" in problems(good.replace("*, ", ""))[0]


# --- links between the pages -------------------------------------------------------------

# The front page holds what a newcomer needs in the first hour; the reference lives in docs/.
README_MAX_BYTES = 16_000  # 15,000 until the install, CPU-only and planner lines


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where ``[x](y)`` is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`]*`", "", text)


def _links(page: Path) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _prose(page.read_text()))


def _anchors(page: Path) -> set[str]:
    """The ids GitHub gives ``page``'s headings: lowercase, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` ... for repeats."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        unique, n = slug, 0
        while unique in anchors:
            n += 1
            unique = f"{slug}-{n}"
        anchors.add(unique)
    return anchors


def test_the_docs_pages_exist() -> None:
    names = {page.name for page in DOCS.glob("*.md")}
    assert {"api.md", "checkpoints.md", "errors.md"} <= names, sorted(names)


def _broken_links(page: Path) -> list[str]:
    """``page``'s relative links whose file, or heading for ``#anchor``, does not exist."""
    broken = []
    for link in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.name})")
    return broken


@pytest.mark.parametrize("page", _pages(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_relative_links_reach_existing_files_and_headings(page: Path) -> None:
    broken = _broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"


def test_the_readme_links_every_docs_page() -> None:
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _links(README)}
    orphans = [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_the_readme_stays_a_short_front_page() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move reference material to docs/"
    )


def test_the_link_checks_catch_broken_links(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing heading, and links inside code are not
    links."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-code-heading) [gone](missing.md) [bad](other.md#nope)\n"
        "`[not](a-link.md)`\n```\n[not](either.md)\n```\n[web](https://example.com/x.md)\n"
    )
    assert _links(page) == [
        "other.md#a-code-heading",
        "missing.md",
        "other.md#nope",
        "https://example.com/x.md",
    ]
    assert _anchors(tmp_path / "other.md") == {"other-page", "a-code-heading"}
    assert _broken_links(page) == [
        "missing.md (no such file)",
        "other.md#nope (no heading #nope in other.md)",
    ]


# --- install lines -----------------------------------------------------------------------------

_PACKAGE = "local_sgd_optim"


def _extras() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return set(parser["options.extras_require"])


def _pip_installs(text: str) -> list[str]:
    """The arguments of every ``pip install`` in ``text`` (code blocks and inline code alike),
    up to the end of the command: a backtick, ``&&``, ``;`` or the end of the line."""
    text = text.replace("\\\n", " ")
    return [m.strip() for m in re.findall(r"pip install ([^`\n;&]+)", text)]


def _install_problems(arguments: str, extras: set[str]) -> list[str]:
    """What is wrong with one ``pip install`` line: this package by bare name (it is not on
    the registry), or an extra that setup.cfg does not define."""
    problems = []
    for word in shlex.split(arguments):
        if word.startswith("-"):
            continue
        name, _, source = (part.strip() for part in word.partition("@"))
        base, _, bracket = name.partition("[")
        ours = base in (".", _PACKAGE, _PACKAGE.replace("_", "-")) or base.startswith(("./", "/"))
        if not ours:
            continue
        if base != "." and not base.startswith(("./", "/")) and not source:
            problems.append(f"{word!r} asks the registry for {_PACKAGE}, which is not published")
        for extra in filter(None, (e.strip() for e in bracket.rstrip("]").split(","))):
            if extra not in extras:
                problems.append(f"{word!r} names the extra {extra!r}, not in setup.cfg")
    return problems


@pytest.mark.parametrize("page", _pages(), ids=lambda page: page.relative_to(ROOT).as_posix())
def test_install_lines_work_as_written(page: Path) -> None:
    extras = _extras()
    problems = [
        p for line in _pip_installs(page.read_text()) for p in _install_problems(line, extras)
    ]
    assert not problems, f"{page.relative_to(ROOT)}: {problems}"


def test_the_readme_installs_from_a_clone_and_says_it_is_unpublished() -> None:
    text = README.read_text()
    lines = _pip_installs(text)
    assert any(line.startswith('-e ".[') for line in lines), lines
    assert "not on PyPI" in text
    assert "https://download.pytorch.org/whl/cpu" in text  # the CPU-only route


def test_the_install_check_catches_bad_lines() -> None:
    extras = {"test", "lightning"}
    text = (
        '`pip install "local_sgd_optim[lightning]"` and\n```bash\npip install -e ".[tset]" '
        '&& python -m pytest\npip install "local_sgd_optim[test] @ git+https://host/x"\n'
        "pip install torch --index-url https://download.pytorch.org/whl/cpu\n```\n"
    )
    lines = _pip_installs(text)
    assert lines == [
        '"local_sgd_optim[lightning]"',
        '-e ".[tset]"',
        '"local_sgd_optim[test] @ git+https://host/x"',
        "torch --index-url https://download.pytorch.org/whl/cpu",
    ]
    assert [p for line in lines for p in _install_problems(line, extras)] == [
        "'local_sgd_optim[lightning]' asks the registry for local_sgd_optim, which is not "
        "published",
        "'.[tset]' names the extra 'tset', not in setup.cfg",
    ]
