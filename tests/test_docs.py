"""The documentation stays true: README.md stays short, every command that README.md and docs/
show still composes with the project's Hydra configs, and every relative link leads somewhere."""

import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The Hydra apps a doc may show, and the config each composes (conf/<name>.yaml).
APPS = {
    ("train.py",): "config",
    ("evaluate.py",): "evaluate",
    ("generate.py",): "generate",
    ("score.py",): "score",
    ("-m", "lm.tools.bench"): "bench",
    ("-m", "lm.tools.export"): "export",
}
# A doc snippet that may hold one of them; `bench` but not `bench_scale`.
MENTIONS_APP = re.compile(
    r"\bpython3?\s+(?:(?:train|evaluate|generate|score)\.py\b|-m\s+lm\.tools\.(?:bench|export)(?![\w.]))"
)
SHELL_SEPARATORS = {"&&", "||", ";", "|"}
# Hydra's own command-line flags, which are not overrides; --info's topic is optional.
FLAGS = {"-m", "--multirun", "-r", "--run", "--resolve", "-h", "--help", "--hydra-help", "--version"}
FLAGS_WITH_VALUE = set("-c --cfg -p --package -cp --config-path -cd --config-dir -i --info".split())
# Overrides that need an optional plugin, dropped only where it is not installed (CI installs both).
PLUGIN_OVERRIDES = {"hydra_plugins.hydra_submitit_launcher": ("hydra/launcher=", "hydra.launcher.")}


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def split_code(text: str) -> tuple[list[tuple[int, str]], str]:
    """The (line, text) of each fenced code line, a trailing backslash joining the next, and the
    text with those blocks blanked (line numbers kept)."""
    code, prose, fence, pending = [], [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        marker = re.match(r"\s*(```+|~~~+)", line)
        if fence is None and marker:
            fence = marker.group(1)
        elif fence is not None and marker and marker.group(1).startswith(fence):
            fence = None
        elif fence is not None:
            start, joined = pending or (number, "")
            pending = (start, joined + line[:-1]) if line.endswith("\\") else None
            if pending is None:
                code.append((start, joined + line))
        prose.append("" if fence is not None or marker else line)
    return code, "\n".join(prose)


def inline_code(prose: str) -> list[tuple[int, str, int, int]]:
    """Inline code spans of the prose: (line, text with line breaks as spaces, start, end)."""
    spans = []
    for match in re.finditer(r"(`+)((?:(?!\n\s*\n).)+?)\1", prose, flags=re.DOTALL):  # within a paragraph
        line = prose.count("\n", 0, match.start()) + 1
        spans.append((line, " ".join(match.group(2).split()), match.start(), match.end()))
    return spans


def doc_snippets(path: Path) -> list[Snippet]:
    """Every fenced code line and every inline code span of a doc that shows one of the apps."""
    fenced, prose = split_code(path.read_text())
    snippets = [Snippet(path, line, text) for line, text in fenced]
    snippets += [Snippet(path, line, text) for line, text, _, _ in inline_code(prose)]
    return [snippet for snippet in snippets if MENTIONS_APP.search(snippet.text)]


def app_commands(snippet: Snippet) -> list[tuple[str, list[str]]]:
    """The app commands in a shell line: (config name, arguments after the app)."""
    words = shlex.split(snippet.text, comments=True)  # as the shell passes them: quotes and comments gone
    commands, segment = [], []
    for word in [*words, ";"]:
        if word not in SHELL_SEPARATORS:
            segment.append(word)
            continue
        while segment and re.fullmatch(r"[A-Za-z_]\w*=.*", segment[0]):  # PTB_DIR=... python train.py
            segment.pop(0)
        if segment and segment[0] in ("python", "python3"):
            for app, config in APPS.items():
                if tuple(segment[1 : 1 + len(app)]) == app:
                    commands.append((config, segment[1 + len(app) :]))
        segment = []
    return commands


def hydra_overrides(arguments: list[str]) -> tuple[list[str], bool]:
    """The overrides among a command's arguments, and whether it is a multirun."""
    overrides, multirun, rest = [], False, list(arguments)
    while rest:
        word = rest.pop(0)
        if word in FLAGS:
            multirun = multirun or word in ("-m", "--multirun")
        elif word in FLAGS_WITH_VALUE:
            if rest and "=" not in rest[0]:
                rest.pop(0)
        else:
            word = re.sub(r"<([\w-]+)>", r"\1", word)  # outputs/<date>/<time>: a placeholder path
            optional = re.fullmatch(r"\[([^\[\]=]+=.*)\]", word)  # [carry_state=true]: shown as optional
            overrides.append(optional.group(1) if optional else word)
    return overrides, multirun


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A multirun's first job: each sweep (a,b lists, ranges, intervals) at its first value."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = []
    for text, override in zip(overrides, parsed, strict=True):
        if not override.is_sweep_override():
            first.append(text)
        elif override.is_interval_sweep():
            first.append(f"{override.get_key_element()}={override.value().start}")
        else:
            first.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}")
    return first


def without_missing_plugins(overrides: list[str]) -> list[str]:
    for module, prefixes in PLUGIN_OVERRIDES.items():
        if importlib.util.find_spec(module) is None:
            overrides = [o for o in overrides if not o.lstrip("+~").startswith(prefixes)]
    return overrides


SNIPPETS = [snippet for path in DOCS for snippet in doc_snippets(path)]


def test_the_readme_is_at_most_250_lines():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


def test_the_docs_show_every_app():
    """A guard on the extraction itself: if it found nothing, the compose test below would pass idly."""
    shown = {config for snippet in SNIPPETS for config, _ in app_commands(snippet)}
    assert shown == set(APPS.values())


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda snippet: snippet.where)
def test_every_command_in_the_docs_composes(snippet):
    try:
        commands = app_commands(snippet)
    except ValueError as error:  # unbalanced quotes
        pytest.fail(f"{snippet.where}: cannot read `{snippet.text}` as a shell command: {error}")
    for config, arguments in commands:
        overrides, multirun = hydra_overrides(arguments)
        try:
            if multirun:
                overrides = first_of_each_sweep(overrides)
            overrides = without_missing_plugins(overrides)
            with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
                compose(config, overrides=overrides, return_hydra_config=True)
        except Exception as error:
            pytest.fail(
                f"{snippet.where}: `{snippet.text}` does not compose with conf/{config}.yaml"
                f" (overrides {overrides}): {type(error).__name__}: {error}"
            )


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_code(path.read_text())
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, flags=re.MULTILINE):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image outside code."""
    _, prose = split_code(path.read_text())
    for _, _, start, end in reversed(inline_code(prose)):  # blank inline code, keep offsets
        prose = prose[:start] + re.sub(r"[^\n]", " ", prose[start:end]) + prose[end:]
    return [
        (prose.count("\n", 0, match.start()) + 1, match.group(1))
        for match in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    ]


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(path):
    broken = []
    for line, target in links(path):
        if re.match(r"[a-zA-Z][\w+.-]*:", target):  # https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        destination = (path.parent / file).resolve() if file else path
        if not destination.exists():
            broken.append(f"{path.relative_to(ROOT)}:{line}: {target} (no such file)")
        elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            broken.append(f"{path.relative_to(ROOT)}:{line}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_design_notes_have_the_sections_that_code_comments_cite():
    headings = re.findall(r"^## (.+)$", (ROOT / "docs" / "design.md").read_text(), flags=re.MULTILINE)
    for section in ("Data", "Model and training", "Perplexity", "Many devices", "Interruptions"):
        assert section in headings, f'docs/design.md has no "## {section}" section'


def test_the_readme_shows_the_test_command_that_ci_runs():
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip("no .ci/run")
    fenced, _ = split_code((ROOT / "README.md").read_text())
    shown = {text.split("#")[0].strip() for _, text in fenced}
    for line in ci.read_text().splitlines():
        if line.startswith("python -m pytest"):
            assert line.strip() in shown, f".ci/run runs `{line}`, which README.md does not show"
