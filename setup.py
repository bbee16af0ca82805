"""Maps the top-level folders (backend/, lora/, kernels/, gateway/, clients/) into
the one import package ``loraplex``; everything else lives in pyproject.toml."""

import os

from setuptools import setup

FOLDERS = ("backend", "lora", "kernels", "gateway", "clients")


def _packages() -> tuple[list[str], dict[str, str]]:
    package_dir = {"loraplex": "loraplex_pkg"}
    packages = ["loraplex"]
    for folder in FOLDERS:
        package_dir[f"loraplex.{folder}"] = folder
        for root, _dirs, files in os.walk(folder):
            if "__init__.py" in files:
                packages.append("loraplex." + root.replace(os.sep, "."))
    return packages, package_dir


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir)
