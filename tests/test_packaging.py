"""setuptools needs every subpackage listed in pyproject's `packages`; an editable install hides an omission."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TOP = {
    "forkwatch": "forkwatch",
    "plugin": "forkwatch.plugin",
    "store": "forkwatch.store",
    "dashboard": "forkwatch.dashboard",
    "demo": "forkwatch.demo",
}


def _packages_on_disk(root: Path = ROOT) -> set[str]:
    found = set()
    for folder, package in TOP.items():
        base = root / folder
        assert (base / "__init__.py").is_file(), f"{folder}/ has no __init__.py"
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if any(part.startswith((".", "__pycache__")) for part in rel.parts):
                continue
            found.add(".".join([package, *rel.parts]))
    return found


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = _packages_on_disk()
    assert on_disk - listed == set(), f"missing from [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"listed in packages but no folder with __init__.py: {sorted(listed - on_disk)}"


def test_package_dir_maps_each_top_level_folder():
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder, package in TOP.items():
        assert package_dir.get(package) == folder, f"package-dir[{package!r}] should be {folder!r}"


def test_the_check_sees_a_nested_subpackage(tmp_path):
    for folder in TOP:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").touch()
    (tmp_path / "plugin" / "losses").mkdir()
    (tmp_path / "plugin" / "losses" / "__init__.py").touch()
    (tmp_path / "store" / "data").mkdir()  # no __init__.py: a data folder, not a package
    assert "forkwatch.plugin.losses" in _packages_on_disk(tmp_path)
    assert not any(p.startswith("forkwatch.store.data") for p in _packages_on_disk(tmp_path))
