"""The documentation against the code: the generated configuration reference is current, every
config key is described, the README stays a short user's guide that starts with the commands CI
runs, and no relative link points at a missing file or heading."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest
from pydantic import BaseModel

from kdray.config import Config, ModelConfig, config_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIG_PAGE = ROOT / "docs" / "configuration.md"
README_LIMIT = 14_000  # characters: a user's guide; measurements and history live in benchmarks/
INSTALL_AND_RUN = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/kdray run"
REGENERATE = ".venv/bin/python docs/generate.py"
LINKED_PAGES = sorted([README, *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")])
# kdray/ is being reorganised into folders; links into it are checked once its layout settles.
UNCHECKED_PREFIXES = ("kdray/",)



def _load_generator():
    """docs/generate.py, which holds the marker and rebuilds the page (not a package module)."""
    spec = importlib.util.spec_from_file_location("kdray_docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


def section_models(model: type[BaseModel] = Config, path: str = "") -> list[tuple[str, type[BaseModel]]]:
    """Every config section reachable from `model`, with its dotted path."""
    found = [(path or "<root>", model)]
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += section_models(field.annotation, f"{path}.{name}" if path else name)
    return found


# ------------------------------------------------------------------------------------ reference
def test_configuration_reference_is_current():
    text = CONFIG_PAGE.read_text(encoding="utf-8")
    assert generate.MARKER in text, f"{CONFIG_PAGE} lost its marker line; restore it and run {REGENERATE}"
    generated = text.partition(generate.MARKER)[2].lstrip("\n")
    assert generated == config_reference(), f"docs/configuration.md is stale: run {REGENERATE}"


def test_generate_check_mode_agrees():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path,model", section_models(), ids=[path for path, _ in section_models()])
def test_every_field_is_described(path, model):
    missing = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"{path} ({model.__name__}): add description= to {missing} in kdray/config.py"


def test_reference_lists_every_key():
    reference = config_reference()
    for path, model in section_models():
        if model is Config:
            continue
        for name, field in model.model_fields.items():
            if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
                assert f"`{path}.{name}`" in reference, f"{path}.{name} is missing from config_reference()"
    assert "`teacher.model.*`" in reference and "`distill.student.*`" in reference  # ModelConfig's extra keys
    assert section_models(ModelConfig)[0][1] is ModelConfig


def test_reference_shows_types_and_defaults():
    reference = config_reference()
    assert "| `distill.temperature` | float > 0 | `4.0` |" in reference
    assert "| `distill.hard_weight` | float in [0, 1] | `0.1` |" in reference
    assert "| `resources.use_gpu` | bool or \"auto\" | `\"auto\"` |" in reference
    assert "| `teacher.model.hidden` | model argument | `[1200, 1200]` |" in reference


# ------------------------------------------------------------------------------------ README
def test_readme_is_short():
    size = len(README.read_text(encoding="utf-8"))
    assert size <= README_LIMIT, (f"README.md has {size} characters, more than {README_LIMIT}: move measurements "
                                  f"to benchmarks/*.md and detail to docs/")


def test_readme_starts_with_the_ci_commands():
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    test_command = next(line for line in ci_lines if "pytest" in line and not line.startswith("#"))
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks[:2] == [INSTALL_AND_RUN, test_command.strip()], (
        "README.md's first two bash blocks must be the set-up commands, verbatim: the install-and-run "
        f"command and .ci/run's test command {test_command.strip()!r}")


# ------------------------------------------------------------------------------------ links
def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\]\(.*?\)|[`*\[]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(match) for match in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)}


def relative_links(page: pathlib.Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        where = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)
        if where.startswith(UNCHECKED_PREFIXES):
            continue
        if not resolved.exists():
            broken.append(f"{target} (no {where})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {where})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_github_anchor_matches_github():
    assert github_anchor("Generalist and specialists (paper, sections 5.2–5.4)") == \
        "generalist-and-specialists-paper-sections-5254"
    assert github_anchor("`local.sh`") == "localsh"
    assert github_anchor("The embedded default (`kdray run` with no config)") == \
        "the-embedded-default-kdray-run-with-no-config"
