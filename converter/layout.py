"""The checkpoint directory: the one module that knows its files, for every operation that writes or reads it.

    OUT/latest_checkpointed_iteration.txt   Megatron-LM's tracker: `release`
    OUT/release/                            torch_dist (metadata.json, .metadata, *.distcp, common state with `args`)
    OUT/megatron_args.sh                    MODEL_ARGS for pretrain_gpt.py (hybrid: pretrain_hybrid.py), derived
    OUT/hf2mcore_spec.py, .json             the --spec hook (megatron_hooks), when the model needs one
    OUT/hf_config.json                      the source config.json
    OUT/hf2mcore.json                       manifest: source, sizes, versions, timings

A training checkpoint (Megatron-LM's own save_checkpoint, `iter_XXXXXXX`) has only the tracker and the torch_dist
directory: what Megatron-LM builds is then read from its saved args.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

from .errors import ConversionError

# (megatron_fields, which imports torch, is imported where it is used: a replayed conversion writes these files
# without torch; replay.py)
HOOK_MODULE = "hf2mcore_spec"  # the --spec module convert writes beside the checkpoint (megatron_hooks.py)
TRACKER = "latest_checkpointed_iteration.txt"
ARGS_FILE = "megatron_args.sh"
MANIFEST = "hf2mcore.json"
HF_CONFIG = "hf_config.json"
HOOK_SETTINGS = HOOK_MODULE + ".json"
HOOK_SOURCE = Path(__file__).with_name("megatron_hooks.py")  # copied, not imported: importing needs megatron-core


def release_dir(root: Path) -> Path:
    return root / "release"


def find_checkpoint(root: str | Path) -> Path:
    """The torch_dist directory of a Megatron-LM checkpoint root (via the tracker file), or the directory itself."""
    root = Path(root)
    if (root / "metadata.json").is_file():
        return root
    tracker = root / TRACKER
    if not tracker.is_file():
        raise ConversionError(f"{root} is not a Megatron checkpoint (no {TRACKER} and no metadata.json)")
    tag = tracker.read_text().strip()
    sub = root / ("release" if tag == "release" else f"iter_{int(tag):07d}" if tag.isdigit() else tag)
    if not (sub / "metadata.json").is_file():
        raise ConversionError(f"{sub} (named by {tracker}) is not a torch_dist checkpoint")
    return sub


def root_of(ckpt: Path) -> Path:
    """The checkpoint root (tracker, side files) of a torch_dist directory."""
    return ckpt.parent if (ckpt.parent / TRACKER).is_file() else ckpt


def common_state(ns: dict) -> dict:
    """What Megatron-LM's load_checkpoint reads from the common state for a --finetune / release load."""
    from . import megatron_fields

    return {"args": megatron_fields.saved_args(ns), "checkpoint_version": 3.0, "iteration": 0}


def write_root(tmp: Path, final: Path, spec, ns: dict, settings: dict | None, hf_config: bytes | None = None,
               manifest: dict | None = None) -> None:
    """Everything beside the torch_dist directory, into `tmp` (renamed to `final` when complete)."""
    (tmp / TRACKER).write_text("release")
    (tmp / ARGS_FILE).write_text(args_text(final, spec, ns, settings))
    if settings is not None:
        shutil.copyfile(HOOK_SOURCE, tmp / (HOOK_MODULE + ".py"))
        (tmp / HOOK_SETTINGS).write_text(json.dumps(settings, indent=1))
    (tmp / HF_CONFIG).write_bytes(hf_config if hf_config is not None else json.dumps(spec.hf_config, indent=2).encode())
    if manifest is not None:
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def config_hash(hf_config: bytes) -> str:
    """The manifest's config_sha256: of the source's config.json as written to hf_config.json."""
    return hashlib.sha256(hf_config).hexdigest()


def gap_lines(spec, settings: dict | None) -> list[str]:
    """One line for each thing Megatron-LM's flags cannot express: fixed here by the hook, or not."""
    out = []
    for g in spec.gaps():
        fixed = g.fix is not None and settings is not None and all(k in settings for k in g.fix)
        out.append(f"{g.field}: {g.what}; rel. logit error {g.measured}; upstream fix: {g.upstream}; "
                   + ("applied here by the --spec hook (convert --exact)" if fixed else
                      "convert --exact applies it through the --spec hook" if g.fix else "no fix from outside"))
    return out


def training_script(ns: dict) -> str:
    """Megatron-LM's entry point for the model: a hybrid layer pattern needs pretrain_hybrid.py."""
    return "pretrain_hybrid.py" if ns.get("hybrid_layer_pattern") else "pretrain_gpt.py"


def use_line(final: Path, script: str) -> str:
    """megatron_args.sh's line that says how to use it (the only one that names the output directory)."""
    out = final.resolve()
    return (f'# use: source {shlex.quote(str(out / ARGS_FILE))} && torchrun ... {script} '
            f'"${{MODEL_ARGS[@]}}" --load {shlex.quote(str(out))} --finetune ...')


def args_text(final: Path, spec, ns: dict, settings: dict | None) -> str:
    from . import megatron_fields

    lines = [f"# Megatron-LM arguments derived by hf2mcore for {spec.architecture}", use_line(final, training_script(ns))]
    lines += [f"# WARNING: {w}" for w in (*spec.warnings, *gap_lines(spec, settings))]
    if settings is not None:
        lines += [f"# --spec {' '.join(ns['spec'])}: the spec from {HOOK_MODULE}.py beside this file "
                  f"({', '.join(settings)})",
                  'export PYTHONPATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)${PYTHONPATH:+:$PYTHONPATH}"']
    parts = megatron_fields.flags(ns)
    groups, cur = [], []
    for p in parts:  # one flag and its values per line
        if p.startswith("--") and cur:
            groups.append(cur)
            cur = []
        cur.append(shlex.quote(p))
    groups.append(cur)
    return "\n".join(lines + ["MODEL_ARGS=("] + ["    " + " ".join(g) for g in groups if g] + [")"]) + "\n"


def read_args(root: Path) -> dict | None:
    """The namespace MODEL_ARGS of root's megatron_args.sh sets, read as text (never run), or None without one."""
    path = root / ARGS_FILE
    if not path.is_file():
        return None
    text = path.read_text()
    start = text.find("MODEL_ARGS=(")
    end = text.find("\n)", start)
    if start < 0 or end < 0:
        raise ConversionError(f"{path} has no MODEL_ARGS=( ... ) block")
    try:
        argv = shlex.split(text[start + len("MODEL_ARGS=("):end], comments=True)
    except ValueError as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from None
    from . import megatron_fields

    return megatron_fields.parse_flags(argv)


def hook_settings(root: Path, ns: dict) -> dict | None:
    """The --spec hook's settings, when the namespace names hf2mcore's hook (JSON: never imported from here);
    None when it does not, or when the directory does not carry them (a training save of a converted model)."""
    spec = ns.get("spec")
    if spec is None:
        return None
    own = [HOOK_MODULE, "hybrid_stack_spec" if ns.get("hybrid_layer_pattern") else "layer_spec"]
    if list(spec) != own:
        raise ConversionError(f"--spec {' '.join(spec)}: hf2mcore builds only its own hook ({' '.join(own)})")
    path = root / HOOK_SETTINGS
    if not path.exists():
        return None
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: {exc}") from None
    if not isinstance(settings, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return settings


def load_common(ckpt: Path) -> dict:
    """The common state (Megatron-LM's `args`, the iteration), read through the allow-lists."""
    from megatron.core import dist_checkpointing

    from .untrusted import reading

    with reading(f"the common state of {ckpt}"):
        return dist_checkpointing.load_common_state_dict(str(ckpt))


def megatron_view(root: Path, ckpt: Path) -> tuple[dict, dict | None]:
    """(namespace, hook settings) of what Megatron-LM builds for this checkpoint: its megatron_args.sh as written,
    else (a training checkpoint) the args its common state saved."""
    ns = read_args(root)
    if ns is None:
        args = load_common(ckpt).get("args")
        if args is None:
            raise ConversionError(f"{ckpt} has neither {ARGS_FILE} nor Megatron-LM arguments in its common state")
        from . import megatron_fields

        ns = megatron_fields.from_saved_args(args)
    return ns, hook_settings(root, ns)


def recorded_hf_config(root: Path) -> dict | None:
    path = root / HF_CONFIG
    if not path.is_file():
        return None
    from .derive import read_config

    return read_config(path)


def hf_config(root: Path, ns: dict, like: Path | None) -> dict:
    """The HF config that describes a checkpoint: --like's, else the one convert recorded, else one re-derived
    from its Megatron-LM arguments."""
    from .derive import read_config
    from .from_args import hf_config_from_args

    if like is not None:
        return read_config(like)
    return recorded_hf_config(root) or hf_config_from_args(ns)


def checkpoint_spec(root: Path, ckpt: Path, like: Path | None = None, family: str | None = None):
    """(spec, namespace, HF config) of a Megatron checkpoint. The MTP depth is the checkpoint's own: a conversion
    may have left the config's MTP layers out, a Megatron-LM run may have added some."""
    from .derive import derive
    from .megatron_fields import value

    ns, _ = megatron_view(root, ckpt)
    cfg = hf_config(root, ns, like)
    mtp = value(ns, "mtp_num_layers") or 0
    if mtp:  # the exported config.json declares them
        cfg = {**cfg, "num_nextn_predict_layers": mtp}
    return derive(cfg, family=family).replace(mtp_layers=mtp), ns, cfg


def manifest(root: Path) -> dict:
    path = root / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}
