"""Bad input, faults and signals (issue 14): one line and exit code 2 (130/143 for signals), nothing half-written
left behind, no input removed, no concurrent run replaced."""
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converter import ConversionError, derive
from converter.atomic import MARK, atomic_dir, sweep_stale
from converter.convert import convert
from converter.hf_io import HFCheckpoint
from test_convert import assert_bit_exact
from tiny import make_model, real_config, with_values

LLAMA = "meta-llama/Llama-2-7b-hf"
CLI = [sys.executable, "-m", "converter"]


def _cli(*args, **kw):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, **kw)


def _one_line(r, code, *words):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in err[0], err[0]


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _config(hf: Path, dst: Path, **changes) -> Path:
    """A copy of hf (its weights linked, not copied) with config.json changed."""
    dst.mkdir()
    for f in hf.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    cfg = json.loads((hf / "config.json").read_text())
    for k, v in changes.items():
        cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ---- config.json -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,words", [
    ("architectures", [["LlamaForCausalLM"]], "architectures"),
    ("text_config", [1], "text_config"),
    ("rope_parameters", "x", "rope_parameters"),
    ("rope_scaling", [1], "rope_scaling"),
    ("rms_norm_eps", "a", "rms_norm_eps"),
    ("hidden_act", ["silu"], "hidden_act"),
    ("quantization_config", "fp8", "quantization_config"),
    ("model_type", 5, "model_type"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings"),
    ("num_hidden_layers", 10**12, "beyond any real model"),
    ("vocab_size", 2**40, "beyond any real model"),
    ("num_attention_heads", -8, "positive integer"),
])
def test_config_field_of_wrong_type_or_size_is_named(field, value, words, tiny_models):
    cfg = json.loads((tiny_models(LLAMA) / "config.json").read_text())
    with pytest.raises(ConversionError, match=re.escape(words)):
        derive({**cfg, field: value})


def test_config_against_the_weights_before_building(tiny_models, tmp_path):
    """A config that says 4000 layers (or another vocabulary) for 2-layer weights stops before any model is built,
    in convert and in inspect."""
    hf = tiny_models(LLAMA)
    many = _config(hf, tmp_path / "many", num_hidden_layers=4000)
    _one_line(_cli("convert", many, tmp_path / "out", "--no-progress"), 2, "4000 layers", "weights hold 2")
    _one_line(_cli("inspect", many, "--format", "json"), 2, "4000 layers")
    vocab = _config(hf, tmp_path / "vocab", vocab_size=100)
    _one_line(_cli("inspect", vocab), 2, "vocab_size=100", "model.embed_tokens.weight")
    huge = _config(hf, tmp_path / "huge", num_hidden_layers=10**12)
    _one_line(_cli("inspect", huge, "--format", "json"), 2, "num_hidden_layers=1000000000000")
    assert not (tmp_path / "out").exists()


# ---- the safetensors index -------------------------------------------------------------------------------------

def _indexed(hf: Path, dst: Path, weight_map) -> Path:
    dst.mkdir()
    shutil.copy(hf / "config.json", dst)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_index_paths_stay_inside_the_model_directory(tiny_models, tmp_path):
    hf = tiny_models(LLAMA)
    names = list(load_file(hf / "model.safetensors"))
    outside = tmp_path / "elsewhere" / "model.safetensors"
    outside.parent.mkdir()
    shutil.copy(hf / "model.safetensors", outside)
    escapes = (str(outside), "../elsewhere/model.safetensors", "sub/../../elsewhere/model.safetensors")
    for i, shard in enumerate(escapes):
        d = _indexed(hf, tmp_path / f"m{i}", {n: shard for n in names})
        with pytest.raises(ConversionError, match="outside"):
            HFCheckpoint(d)
    _one_line(_cli("convert", tmp_path / "m0", tmp_path / "out", "--no-progress"), 2, "outside", str(outside))
    lst = _indexed(hf, tmp_path / "list", [["a", "b"]])
    _one_line(_cli("convert", lst, tmp_path / "out", "--no-progress"), 2, "weight_map")
    assert not (tmp_path / "out").exists()


# ---- NaN and Inf -----------------------------------------------------------------------------------------------

def test_nonfinite_weights_stop_the_conversion_by_name(tiny_models, tmp_path):
    hf = tiny_models(LLAMA)
    bad = with_values(hf, tmp_path / "bad", {"model.layers.1.mlp.up_proj.weight": ((3, 5), float("nan")),
                                             # finite in fp32, Inf once cast to fp16
                                             "model.layers.0.self_attn.k_proj.weight": ((0, 0), 1e6)})
    _one_line(_cli("convert", bad, tmp_path / "out", "--no-progress"), 2, "model.layers.1.mlp.up_proj.weight",
              "1 non-finite", "--allow-nonfinite")
    with pytest.raises(ConversionError, match=r"model.layers.0.self_attn.k_proj.weight.*as float16"):
        convert(bad, tmp_path / "out", dtype="fp16", progress=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")
    # on purpose: it converts, says so in hf2mcore.json, and verify then fails on the NaN logits, without
    # reporting an agreement it cannot measure
    r = _cli("convert", bad, tmp_path / "out", "--no-progress", "--dtype", "fp32", "--allow-nonfinite")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "hf2mcore.json").read_text())["checked_finite"] is False
    r = _cli("verify", bad, tmp_path / "out")
    assert r.returncode == 1 and "non-finite logits" in r.stdout and "top-1" not in r.stdout, r.stdout


# ---- publishing ------------------------------------------------------------------------------------------------

def test_publish_never_replaces_what_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="appeared while this run was writing"):
        with atomic_dir(out, overwrite=False) as tmp:
            (tmp / "mine").write_text("new")
            out.mkdir()  # another run published first (even an empty directory is kept)
    assert out.is_dir() and not any(out.iterdir()) and not _leftovers(tmp_path, "out")
    (out / "theirs").write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "mine").write_text("new")
    assert [p.name for p in out.iterdir()] == ["mine"] and not _leftovers(tmp_path, "out")


def test_stale_temporary_directories_are_swept(tmp_path):
    out = tmp_path / "out"
    dead, alive, foreign = (tmp_path / f".out.tmp-{n}" for n in (11, 12, 13))
    for d in (dead, alive, foreign):
        d.mkdir()
        (d / "x").write_text("partial")
    (dead / MARK).touch()
    (alive / MARK).touch()
    old = time.time() - 3600
    for d in (dead, alive, foreign):
        os.utime(d, (old, old))
    fd = os.open(alive, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a run still writing holds its lock
    try:
        assert sweep_stale(out, inputs=(dead / "x",)) == []  # an input, or what holds one, is never removed
        assert sweep_stale(out) == [dead]
    finally:
        os.close(fd)
    assert alive.is_dir() and foreign.is_dir()  # never one that is not hf2mcore's


# ---- signals, killed parents and concurrent runs (a model that takes a few seconds to write) ---------------------

@pytest.fixture(scope="module")
def sizable(tmp_path_factory):
    """A Llama of about 200 MB in bf16: long enough to write that a signal lands while it is written."""
    cfg = {**real_config(LLAMA), "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 8,
           "num_key_value_heads": 8, "num_hidden_layers": 4, "vocab_size": 32000}
    return make_model(cfg, tmp_path_factory.mktemp("sizable") / "hf", dtype=torch.bfloat16)


def _start(*args, env=None):
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


def _when_writing(tmp_path: Path, name: str, timeout: float = 60.0) -> None:
    """Wait until a run has started writing OUT's data file in its temporary directory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(tmp_path.glob(f".{name}.tmp-*/release/*.distcp")):
            return
        time.sleep(0.005)
    raise AssertionError("the run never started writing")


def _ranks_gone(pgid: int, timeout: float = 40.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,workers", [(signal.SIGTERM, 143, "1"), (signal.SIGTERM, 143, "2"),
                                               (signal.SIGINT, 130, "2")])
def test_signal_cleans_up_and_exits(sig, code, workers, sizable, tmp_path):
    p = _start("convert", sizable, tmp_path / "out", "--no-progress", "--workers", workers)
    _when_writing(tmp_path, "out")
    p.send_signal(sig)  # the parent only: it stops its ranks itself
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert err.strip().splitlines() == [f"hf2mcore: stopped by {sig.name}; nothing was published "
                                        "(the partial output was removed)"], err
    assert _ranks_gone(p.pid)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")


# a stop signal that arrives while a gc callback runs (collector.py's), where Python drops what a callback raises
STOP_IN_GC_CALLBACK = """
import gc, os, signal, sys, time
from converter.stopping import Stopped, exceptions_lost, install
install()

@exceptions_lost
def callback(phase, info):
    if phase == "start":
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10000):  # the handler runs in here
            pass

gc.callbacks.append(callback)
try:
    gc.collect()
    time.sleep(5)
    print("not stopped")
except Stopped:
    print("stopped")
"""


def test_a_stop_during_a_gc_callback_is_not_lost():
    r = subprocess.run([sys.executable, "-c", STOP_IN_GC_CALLBACK], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "stopped", (r.stdout, r.stderr)


@pytest.mark.slow
def test_killed_parent_takes_its_ranks_and_the_next_run_sweeps(sizable, tmp_path):
    temp = tmp_path / "temp"  # where the ranks' directory goes (their rendezvous store)
    temp.mkdir()
    p = _start("convert", sizable, tmp_path / "out", "--no-progress", "--workers", "2",
               env={**os.environ, "TMPDIR": str(temp)})
    _when_writing(tmp_path, "out")
    assert [d.name[:17] for d in temp.iterdir()] == ["hf2mcore-workers-"]
    p.kill()  # SIGKILL: no cleanup in the parent; its ranks get SIGTERM from the kernel
    p.wait()
    assert _ranks_gone(p.pid)
    time.sleep(1)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path, "out")
    assert not list(temp.iterdir()), "the ranks remove their directory, which their parent could not"
    # a single process killed outright leaves its temporary directory: the next run into OUT removes it
    p = _start("convert", sizable, tmp_path / "out", "--no-progress", "--workers", "1")
    _when_writing(tmp_path, "out")
    p.kill()
    p.wait()
    # its temporary directory, and the early copying's (preplace.py) if the kill came before that was emptied
    left = _leftovers(tmp_path, "out")
    assert sorted(left)[0] == f".out.tmp-{p.pid}" and set(left) <= {f".out.tmp-{p.pid}", f".out.tmp-{p.pid}-early"}
    old = time.time() - 3600
    for name in left:
        os.utime(tmp_path / name, (old, old))
    r = _cli("convert", sizable, tmp_path / "out", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not _leftovers(tmp_path, "out")


@pytest.mark.slow
def test_concurrent_runs_to_one_output(sizable, tmp_path):
    runs = [_start("convert", sizable, tmp_path / "out", "--no-progress", "--workers", w) for w in ("1", "2")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert re.search(r"appeared while this run was writing|exists; pass --overwrite", err), err
    assert not _leftovers(tmp_path, "out")
    from converter.export import export

    assert_bit_exact(sizable, export(tmp_path / "out", tmp_path / "back", like=sizable, progress=False))


# ---- the disk ----------------------------------------------------------------------------------------------------

def _on_small_disk(script: str, mnt: Path, size: str = "1m") -> subprocess.CompletedProcess:
    """Run `script` (sh) with a tmpfs of `size` at mnt, in a private mount namespace (no root needed)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a small disk")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces are unavailable here: {probe.stderr.decode().strip()}")
    mnt.mkdir(exist_ok=True)
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} none {mnt} && {script}"],
                          capture_output=True, text=True)


def test_full_disk_names_the_disk_and_the_bytes(tiny_models, tmp_path):
    hf, mnt = tiny_models(LLAMA), tmp_path / "mnt"
    cli = " ".join(CLI)
    # too small from the start: refused before writing
    r = _on_small_disk(f"{cli} convert {hf} {mnt}/out --no-progress; echo rc=$?; ls -A {mnt}", mnt, "64k")
    assert "rc=2" in r.stdout and r.stdout.strip().endswith("rc=2"), r.stdout + r.stderr
    m = re.search(r"needs [\d.]+ MiB \(([\d,]+) bytes\), the disk at (\S+) has", r.stderr)
    assert m and m.group(2) == str(mnt), r.stderr
    need = int(m.group(1).replace(",", ""))
    # enough by the estimate, too little for the files' own overhead: the writer fails midway
    fill = 1024 * 1024 - need - 8192
    r = _on_small_disk(f"head -c {fill} /dev/zero > {mnt}/fill && {cli} convert {hf} {mnt}/out --no-progress; "
                       f"echo rc=$?; ls -A {mnt}", mnt, "1m")
    assert r.stdout.split() == ["rc=2", "fill"], r.stdout + r.stderr
    err = [line for line in r.stderr.splitlines() if "WARNING" not in line]
    assert len(err) == 1 and f"no space left on the disk at {mnt} while writing {mnt}/out" in err[0], r.stderr


# ---- corrupt checkpoints, --debug and ModelOpt's state -----------------------------------------------------------

def test_corrupt_checkpoint_is_one_line_and_debug_shows_the_traceback(tiny_models, tmp_path):
    hf = tiny_models(LLAMA)
    ck = convert(hf, tmp_path / "ck", dtype="fp32", progress=False)
    data = next((ck / "release").glob("*.distcp"))
    with open(data, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 2000)
    _one_line(_cli("verify", hf, ck), 2, "cannot read")
    r = _cli("verify", hf, ck, "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_crafted_modelopt_state_is_refused(tiny_models, tmp_path, monkeypatch):
    """ModelOpt's own reader takes a legacy modelopt_state/common.pt with torch.load, which
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns into plain pickle: load_quantized reads it through the allow-list."""
    pytest.importorskip("modelopt.torch.quantization")
    from converter.quantize import load_quantized

    ck = convert(tiny_models(LLAMA), tmp_path / "ck", dtype="fp32", progress=False)
    marker = tmp_path / "pwned"
    state = ck / "release" / "modelopt_state"
    state.mkdir()
    torch.save({"modelopt_version": "0.47.0", "evil": _Payload(marker)}, state / "common.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ConversionError, match="refusing to unpickle the global (builtins.)?exec in modelopt_state"):
        load_quantized(ck, device="cpu")
    assert not marker.exists()
