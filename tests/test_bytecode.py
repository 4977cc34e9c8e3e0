"""imports.cache_bytecode: where Python may not write bytecode beside the sources and a package came without it,
its bytecode is cached in hf2mcore's cache directory, so that only the first run compiles it."""
import compileall
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the decision, then the import it is for; prints the prefix chosen and where the module's bytecode lies
PROBE = ("import sys; from converter.imports import cache_bytecode; print(cache_bytecode('pkgx')); import pkgx; "
         "print(pkgx.__spec__.cached)")


@pytest.fixture
def package(tmp_path):
    src = tmp_path / "site" / "pkgx"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("VALUE = 42\n")
    return src


def _probe(tmp_path, *, dont_write: bool) -> list[str]:
    env = {**os.environ, "HF2MCORE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPYCACHEPREFIX", None)
    if dont_write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bytecode_goes_to_the_cache_where_it_may_not_go_beside_the_sources(tmp_path, package):
    prefix, cached = _probe(tmp_path, dont_write=True)
    assert prefix == str(tmp_path / "cache" / "pycache")
    assert Path(cached).is_file() and Path(cached).is_relative_to(prefix)  # written there by the first run
    assert not (package / "__pycache__").exists(), "nothing is written beside the installed sources"
    written = Path(cached).stat().st_mtime_ns
    assert _probe(tmp_path, dont_write=True) == [prefix, cached]  # the next run reads it there
    assert Path(cached).stat().st_mtime_ns == written, "read, not compiled again"


def test_nothing_changes_where_bytecode_is_at_hand_or_may_be_written(tmp_path, package):
    compileall.compile_dir(package, quiet=1)  # installed with its bytecode (pip's default)
    prefix, cached = _probe(tmp_path, dont_write=True)
    assert prefix == "None" and Path(cached).parent == package / "__pycache__"
    assert not (tmp_path / "cache").exists()
    for f in (package / "__pycache__").iterdir():
        f.unlink()
    prefix, cached = _probe(tmp_path, dont_write=False)  # Python writes it beside the sources itself
    assert prefix == "None" and Path(cached).is_file() and Path(cached).parent == package / "__pycache__"
    assert not (tmp_path / "cache").exists()
