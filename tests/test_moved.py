"""promcse 0.1's documented module paths (``promcse.sts``, ...) still import, warn, and are the new modules."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from promcse._moved import MOVED

FRESH = """
import warnings, importlib, sys
warnings.simplefilter("error", DeprecationWarning)
try:
    importlib.import_module(sys.argv[1])
except DeprecationWarning as w:
    print("WARNED", w)
"""


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_new_module_and_warns(old: str) -> None:
    with pytest.warns(DeprecationWarning, match=MOVED[old].replace(".", r"\.")):
        sys.modules.pop(old, None)
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED[old])
    assert module is new
    assert new.__spec__ is not None and new.__spec__.name == MOVED[old]  # the alias did not rename it


def test_old_path_warns_in_a_fresh_interpreter() -> None:
    out = subprocess.run([sys.executable, "-c", FRESH, "promcse.sts"], capture_output=True, text=True, check=True)
    assert "WARNED promcse.sts moved to promcse.evaluation.sts" in out.stdout


def test_documented_names_from_old_paths() -> None:
    with pytest.warns(DeprecationWarning):
        sys.modules.pop("promcse.sts", None)
        from promcse.sts import evaluate
    from promcse.evaluation.sts import evaluate as new_evaluate

    assert evaluate is new_evaluate


def test_names_of_old_modules_that_became_folders() -> None:
    import promcse.corpus
    import promcse.export

    promcse.corpus.__dict__.pop("EncodeJob", None)
    with pytest.warns(DeprecationWarning, match=r"promcse\.corpus\.encode\.EncodeJob"):
        from promcse.corpus import EncodeJob
    from promcse.corpus.encode import EncodeJob as new

    assert EncodeJob is new
    promcse.export.__dict__.pop("MTEBEncoder", None)
    with pytest.warns(DeprecationWarning, match="MTEBEncoder"):
        assert promcse.export.MTEBEncoder.__module__ == "promcse.export.sentence_transformers"
    with pytest.raises(AttributeError):
        promcse.corpus.no_such_name  # noqa: B018


def test_undocumented_old_paths_are_gone() -> None:
    for old in ("promcse.tiled", "promcse.objective", "promcse.step"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
