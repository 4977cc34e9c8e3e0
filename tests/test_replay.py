"""A conversion replayed without torch (replay.py): a second source of a shape converted before is written as the
conversion through megatron-core writes it, byte for byte, with the same checks, and no weight is ever recorded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converter import derive
from converter.replay import UNREAD, read_fields
from tiny import CONFIGS, make_model, tiny_config, with_values

LLAMA, MOE = "meta-llama/Llama-3.2-1B", "Qwen/Qwen3-30B-A3B"
# the command line in a fresh interpreter; the last line says whether torch was imported
CLI = ("import sys; from converter.cli import main; rc = main(sys.argv[1:]); print('torch' in sys.modules); "
       "sys.exit(rc)")


def _cli(records, *args):
    env = {**os.environ, "HF2MCORE_REPLAY": str(records)}
    return subprocess.run([sys.executable, "-c", CLI, *map(str, args)], capture_output=True, text=True, env=env)


# what an instruct release changes of its base model's config.json (Llama-3.1-8B -> -Instruct)
INSTRUCT = {"eos_token_id": [128001, 128008, 128009], "transformers_version": "4.42.3"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two sources of each shape, bf16 as released: other weights, and the second's config.json that of an instruct
    release of the first (it differs in fields no conversion reads)."""
    root = tmp_path_factory.mktemp("replay")
    out = {}
    for name in (LLAMA, MOE):
        for seed in (0, 1):
            out[name, seed] = make_model(tiny_config(name), root / f"{name.replace('/', '_')}_{seed}",
                                         dtype=torch.bfloat16, seed=seed)
        path = out[name, 1] / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **INSTRUCT}, indent=1))
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name,workers", [(LLAMA, 2), (MOE, 1)])
def test_a_replay_writes_the_files_the_conversion_through_torch_writes(sources, tmp_path, name, workers):
    records = tmp_path / "records"
    r = _cli(records, "convert", sources[name, 0], tmp_path / "first", "--workers", workers, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert len(list(records.iterdir())) == 1
    r = _cli(records, "convert", sources[name, 1], tmp_path / "replayed", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "False", "a replay imports neither torch nor megatron-core"
    r = _cli("off", "convert", sources[name, 1], tmp_path / "torch", "--workers", workers, "--no-progress")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "True", r.stderr
    replayed, through_torch = _files(tmp_path / "replayed"), _files(tmp_path / "torch")
    assert sorted(replayed) == sorted(through_torch)
    for f in replayed:
        if f.startswith("release/") or f == "hf_config.json":
            assert replayed[f] == through_torch[f], f
    assert replayed["hf_config.json"] == (sources[name, 1] / "config.json").read_bytes()  # its own, not the first's
    manifest, theirs = json.loads(replayed["hf2mcore.json"]), json.loads(through_torch["hf2mcore.json"])
    assert manifest["writer"].startswith("replayed") and manifest["source"] == str(sources[name, 1].resolve())
    own = ("source", "seconds", "processes", "writer")  # of the run, not of the checkpoint
    assert {k: v for k, v in manifest.items() if k not in own} == {k: v for k, v in theirs.items() if k not in own}
    # megatron_args.sh names its own directory, and is otherwise the same
    args = replayed["megatron_args.sh"].decode()
    assert str((tmp_path / "replayed").resolve()) in args and "/torch" not in args
    assert args.replace(str((tmp_path / "replayed").resolve()), "X") == \
        through_torch["megatron_args.sh"].decode().replace(str((tmp_path / "torch").resolve()), "X")
    # the weights are the second source's: not the first's recorded
    first = _files(tmp_path / "first")
    assert any(replayed[f] != first[f] for f in replayed if f.endswith(".distcp"))


def test_a_replay_checks_what_the_conversion_checks(sources, tmp_path):
    records = tmp_path / "records"
    assert _cli(records, "convert", sources[LLAMA, 0], tmp_path / "first", "--no-progress").returncode == 0
    bad = with_values(sources[LLAMA, 1], tmp_path / "bad", {"model.layers.1.mlp.up_proj.weight": ((3, 5), float("nan"))})
    r = _cli(records, "convert", bad, tmp_path / "out", "--no-progress")
    assert r.returncode == 2 and r.stdout.strip() == "False", (r.stdout, r.stderr)  # stopped by the replay
    assert "model.layers.1.mlp.up_proj.weight holds 1 non-finite values" in r.stderr and "--allow-nonfinite" in r.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    r = _cli(records, "convert", bad, tmp_path / "allowed", "--no-progress", "--allow-nonfinite")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "True", "another key: converted through torch"
    r = _cli(records, "convert", sources[LLAMA, 1], tmp_path / "first", "--no-progress")
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr and r.stdout.splitlines()[-1] == "False"
    # a shard cut short after the key was taken from its header
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_bytes((sources[LLAMA, 1] / "config.json").read_bytes())
    data = (sources[LLAMA, 1] / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-4096])
    r = _cli(records, "convert", cut, tmp_path / "out", "--no-progress")
    assert r.returncode == 2 and "lies past the end of the file" in r.stderr and len(r.stderr.splitlines()) == 1


# the replay's first copy fails (a full disk); every later copy waits for that failure, then counts itself
FAILING = """
import errno, sys, threading
import converter.replay as r
real, copies, failed = r.direct_copy, [], threading.Event()
def copy(*a):
    if not failed.is_set():
        failed.set()
        raise OSError(errno.ENOSPC, "No space left on device")
    copies.append(a)
    return real(*a)
r.direct_copy = copy
from converter.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    print(len(copies))
sys.exit(rc)
"""


def test_a_file_that_fails_to_replay_ends_the_files_written_beside_it(sources, tmp_path):
    """A replay writes its files at once, one thread per core; when one fails, the others stop at their next
    piece instead of copying their whole file first, and nothing is left behind."""
    from converter.launch import cores

    records = tmp_path / "records"
    r = _cli(records, "convert", sources[LLAMA, 0], tmp_path / "first", "--workers", 2, "--no-progress")
    assert r.returncode == 0, r.stderr
    pieces = sum(1 for _ in (tmp_path / "first" / "release").glob("__*.distcp"))
    assert pieces == 2  # two files of many pieces each, written by two threads where there are two cores
    env = {**os.environ, "HF2MCORE_REPLAY": str(records)}
    r = subprocess.run([sys.executable, "-c", FAILING, "convert", str(sources[LLAMA, 1]), str(tmp_path / "out"),
                        "--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "No space left on device" in r.stderr, (r.stdout, r.stderr)
    assert int(r.stdout.splitlines()[-1]) < min(cores(), 2)  # at most the piece another thread had begun
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_nothing_is_recorded_that_holds_weights_or_does_not_match(sources, tmp_path):
    records = tmp_path / "records"
    # a cast makes every tensor in memory: its bytes would be weights
    r = _cli(records, "convert", sources[LLAMA, 0], tmp_path / "fp32", "--dtype", "fp32", "--no-progress")
    assert r.returncode == 0 and not records.exists()
    assert _cli(records, "convert", sources[LLAMA, 0], tmp_path / "a", "--no-progress").returncode == 0
    # another config (one field) is another shape: converted through torch
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((sources[LLAMA, 1] / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    (other / "model.safetensors").symlink_to(sources[LLAMA, 1] / "model.safetensors")
    r = _cli(records, "convert", other, tmp_path / "b", "--no-progress")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "True"
    assert json.loads((tmp_path / "b" / "hf2mcore.json").read_text())["writer"].startswith("megatron-core")
    assert len(list(records.iterdir())) == 2
    # off: neither recorded nor replayed
    r = _cli("off", "convert", sources[LLAMA, 1], tmp_path / "c", "--no-progress")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "True"


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*/*/config.json")), ids=lambda p: p.parent.name)
def test_no_conversion_reads_the_fields_the_key_leaves_out(config):
    """What the key leaves out (UNREAD) changes nothing derive makes of a real config: changed or left out, the
    Megatron view is the same (the plan and the mappings see only the spec)."""
    cfg = json.loads(config.read_text())
    try:
        base = derive(cfg)
    except Exception as exc:  # refused (by name, test_derive.py): then whatever the fields, refused the same
        with pytest.raises(type(exc)):
            derive({**cfg, **{f: 7 for f in UNREAD}})
        return

    def view(spec):
        return spec, spec.megatron_namespace(), spec.hook_settings(), spec.hook_settings(exact=True), spec.warnings

    def everywhere(c, change):  # the top level, and a multimodal config's text_config, where derive reads too
        out = change(dict(c))
        if isinstance(out.get("text_config"), dict):
            out["text_config"] = change(dict(out["text_config"]))
        return out

    for value in (7, "x", [1, 2], None):
        assert view(derive(everywhere(cfg, lambda d: {**d, **{f: value for f in UNREAD}}))) == view(base), value
    left_out = everywhere(cfg, lambda d: {k: v for k, v in d.items() if k not in UNREAD})
    assert view(derive(left_out)) == view(base)
    assert read_fields(json.dumps(left_out).encode()) == read_fields(config.read_bytes())
