"""The explicit package list in pyproject.toml covers every package folder of the checkout."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("conftrl", "datamodules")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found - {"conftrl.conf"} <= listed, f"add to pyproject.toml: {sorted(found - listed)}"
    assert listed - {"conftrl.conf"} <= found, f"listed but missing: {sorted(listed - found)}"
    assert (ROOT / "conf" / "__init__.py").is_file() and (ROOT / "conf" / "train.yaml").is_file()
