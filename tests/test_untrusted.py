"""Reading a checkpoint from elsewhere runs none of its code: a crafted `.metadata` or common state whose
unpickling would write a file is refused by name, with one line and exit code 2, in export, verify and the
library's loaders."""
import pickle
import shutil
import subprocess
import sys

import pytest

from converter import ConversionError, layout
from converter.convert import convert
from converter.mcore_io import ChunkReader


class Payload:
    """Unpickling this writes `marker`: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "converter", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory):
    hf = tiny_models("meta-llama/Llama-2-7b-hf")
    return hf, convert(hf, tmp_path_factory.mktemp("untrusted") / "mc", dtype="fp32", progress=False)


def _refused(r, marker, what):
    assert r.returncode == 2, r.stdout + r.stderr
    assert what in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not marker.exists()


def test_crafted_metadata_is_refused(checkpoint, tmp_path):
    hf, good = checkpoint
    ck = shutil.copytree(good, tmp_path / "ck")
    marker = tmp_path / "pwned"
    (ck / "release" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _refused(_cli("export", ck, tmp_path / "back"), marker, "builtins.exec")
    _refused(_cli("verify", hf, ck), marker, "builtins.exec")
    with pytest.raises(ConversionError, match="builtins.exec"):
        ChunkReader(ck / "release")
    with pytest.raises(ConversionError, match="builtins.exec"):
        layout.load_common(ck / "release")
    assert not marker.exists() and not (tmp_path / "back").exists()


def test_crafted_common_state_is_refused(tiny_models, tmp_path, monkeypatch):
    """The common state is a torch.save'd dict inside the torch_dist files (megatron-core's `common_state`)."""
    hf = tiny_models("meta-llama/Llama-2-7b-hf")
    marker = tmp_path / "pwned"
    common = layout.common_state
    monkeypatch.setattr(layout, "common_state", lambda ns: {**common(ns), "evil": Payload(marker)})
    ck = convert(hf, tmp_path / "mc", dtype="fp32", progress=False)
    assert not marker.exists()
    _refused(_cli("verify", hf, ck), marker, "the global exec")
    (ck / "megatron_args.sh").unlink()  # export then reads Megatron-LM's args from the common state
    (ck / "hf_config.json").unlink()
    _refused(_cli("export", ck, tmp_path / "back"), marker, "the global exec")
    assert not (tmp_path / "back").exists()
    with pytest.raises(ConversionError, match="the global exec"):
        layout.load_common(ck / "release")
