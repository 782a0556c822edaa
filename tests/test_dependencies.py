"""The dependency bounds keep out the releases known to be malicious or unsafe."""

from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from lm import PROJECT_ROOT

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

# Lightning's advisory GHSA-w37p-236h-pfx3: 2.6.2 and 2.6.3 ran a credential stealer at import;
# releases before 2.6.6 let load_from_checkpoint run code.
UNSAFE_LIGHTNING = ["2.6.0", "2.6.1", "2.6.2", "2.6.3", "2.6.4", "2.6.5"]


def requirement(name: str) -> Requirement:
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    return next(r for r in map(Requirement, project["dependencies"]) if r.name == name)


def test_the_lightning_bound_excludes_its_unsafe_releases_and_admits_the_fixed_ones():
    specifier = requirement("lightning").specifier
    assert not [release for release in UNSAFE_LIGHTNING if specifier.contains(release)]
    assert specifier.contains("2.6.6") and not specifier.contains("3.0.0")


def test_the_installed_lightning_is_not_an_unsafe_release():
    assert Version(version("lightning")) >= Version("2.6.6")
