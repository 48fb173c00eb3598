"""pytest: the stage folders (train/, export/, compile/, runtime/) are the packages plateau.train, ... (see
pyproject.toml). pytest would import their test modules under the folder name (`export.test_export`), loading each
stage a second time as a different package: its registrations would run twice and its classes exist twice. Each
folder name is made an alias of its plateau package instead, so a test module joins the package it tests.
"""

import importlib
import sys

for _stage in ("train", "export", "compile", "runtime"):
    sys.modules.setdefault(_stage, importlib.import_module(f"plateau.{_stage}"))
