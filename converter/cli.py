"""Command line: parse, call the library, turn known errors into one line and exit code 2."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import pickle
import sys
import warnings
from pathlib import Path

from .errors import ConversionError, one_line, root_failure
from .stopping import install, stopped


def _quiet() -> None:
    # megatron-core logs a GPTModel deprecation notice and CPU fallbacks on every build; not the user's concern.
    warnings.filterwarnings("ignore")
    # (and torch's "No CUDA runtime is found" on CPU machines)
    # (DCP's own logger is set to DEBUG, into a NullHandler: 2 records made and dropped per state dict entry)
    for name in ("megatron", "megatron.core", "torch.distributed", "torch.utils.cpp_extension", "transformers",
                 "c10d-NullHandler-dcp_logger"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def _hf_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from .default_model import smollm2_dir

    print("no HF_DIR given: using the embedded SmolLM2-135M-Instruct", file=sys.stderr)
    return smollm2_dir()


def cmd_inspect(a) -> int:
    from . import megatron_fields
    from .derive import derive, hf_param_count, mcore_param_count
    from .hf_io import has_weights
    from .layout import gap_lines

    path = _hf_dir(a.path)
    spec = derive(path, family=a.family)
    spec.check_parallel(a.tp, a.pp, a.ep, a.etp)
    if path.is_dir() and has_weights(path):  # weights at hand: the config must describe them
        from .dequant import open_source
        from .plan import check_source

        hf = open_source(path, spec)
        check_source(spec, {n: hf.shape(n) for n in hf.names()})
    ns, settings = spec.megatron_namespace(a.tp, a.pp, a.ep, a.etp, exact=a.exact), spec.hook_settings(a.exact)
    notes = [*spec.warnings, *gap_lines(spec, settings)]
    if a.format == "args":
        print("".join(f"# WARNING: {w}\n" for w in notes) + " ".join(megatron_fields.flags(ns)))
        return 0
    if a.format == "json":
        params = {"hf": hf_param_count(spec), "megatron": mcore_param_count(spec)}
        print(json.dumps({"architecture": spec.architecture, "family": spec.family, "megatron_args": ns,
                          "flags": megatron_fields.flags(ns), "spec_hook": settings, "params": params,
                          "warnings": notes}, indent=2))
        return 0
    print(f"{spec.architecture}  (family: {spec.family})")
    width = max(map(len, ns))
    for k, v in ns.items():
        print(f"  {k:<{width}}  {v}")
    for w in notes:
        print(f"WARNING: {w}")
    return 0


def _out_dir(a, hf: Path) -> Path:
    return Path(a.out_dir) if a.out_dir else Path("out") / hf.name


def _replay_options(a) -> dict:
    from .replay import options

    return options(tp=a.tp, pp=a.pp, ep=a.ep, etp=a.etp, dtype=a.dtype, family=a.family, exact=a.exact,
                   allow_nonfinite=a.allow_nonfinite, mtp=not a.no_mtp)


def cmd_convert(a) -> int:
    from .convert import convert

    hf = _hf_dir(a.hf_dir)
    out = _out_dir(a, hf)
    if a.quantize:
        a.src, a.out_dir, a.format, a.like = hf, out, a.quantize, None
        return cmd_quantize(a)
    from .runtime import launched_by_torchrun

    if launched_by_torchrun() and a.verify:
        raise ConversionError("--verify runs in one process: verify after the parallel conversion")
    from .collector import survivors_frozen

    with survivors_frozen():
        convert(hf, out, tp=a.tp, pp=a.pp, ep=a.ep, etp=a.etp, dtype=a.dtype, overwrite=a.overwrite,
                family=a.family, progress=not a.no_progress, workers=a.workers, exact=a.exact,
                allow_nonfinite=a.allow_nonfinite, mtp=not a.no_mtp)
    if launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        return 0
    from .layout import manifest, read_args, training_script

    return _converted(a, hf, out, training_script(read_args(out)), manifest(out))


def _converted(a, hf: Path, out: Path, script: str, recorded: dict) -> int:
    from .layout import use_line

    # (the argument file's own line, quoted for the shell: an output path may hold spaces or quotes)
    print(f"wrote {out} (Megatron-LM: {use_line(out, script).removeprefix('# use: ')})")
    for w in [*recorded.get("warnings", []), *recorded.get("megatron_lm_gaps", [])]:
        print(f"WARNING: {w}")
    if a.verify:
        return _report(hf, out, a)
    return 0


def cmd_verify(a) -> int:
    return _report(_hf_dir(a.hf_dir), Path(a.mcore_dir), a)


def _report(hf: Path, out: Path, a) -> int:
    from .verify import verify

    r = verify(hf, out, device=getattr(a, "device", "cpu"), family=a.family, tol=a.tol)
    if any(r["nonfinite"].values()):  # agreement figures over NaN mean nothing
        print(f"verify: non-finite logits (Megatron {r['nonfinite']['megatron']}, HF {r['nonfinite']['hf']} "
              f"of {r['tokens']} tokens x vocabulary) -> FAILED")
        return 1
    print(f"verify: max abs err {r['max_abs_err']:.3g}, rel err {r['rel_err']:.3g} (tolerance {r['tolerance']:g}), "
          f"top-1 agreement {100 * r['top1_agreement']:.1f}% over {r['tokens']} tokens -> "
          + ("OK" if r["ok"] else "FAILED"))
    for w in r["megatron_lm_gaps"]:
        print(f"  Megatron-LM gap: {w}")
    return 0 if r["ok"] else 1


def cmd_export(a) -> int:
    from .export import export

    out = export(a.mcore_dir, a.out_dir, like=a.like, dtype=a.dtype, shard_size=a.shard_size,
                 overwrite=a.overwrite, family=a.family, progress=not a.no_progress)
    print(f"wrote {out}")
    return 0


def cmd_quantize(a) -> int:
    from .quantize import quantize_checkpoint

    r = quantize_checkpoint(a.src or _hf_dir(None), a.out_dir, a.format, like=a.like, calib_data=a.calib_data,
                            calib_size=a.calib_size, calib_seq_len=a.calib_seq_len,
                            calib_batch_size=a.calib_batch_size, eval_data=a.eval_data, eval_size=a.eval_size,
                            export_hf=a.export_hf, quantize_output_layer=a.quantize_output_layer,
                            overwrite=a.overwrite, family=a.family)
    q = r["quantized"]
    print(f"wrote {a.out_dir} ({r['format']}; report in {a.out_dir}/quant_report.json)")
    print(f"perplexity bf16 {r['bf16']['perplexity']:.3f} -> {r['format']} {q['perplexity']:.3f} "
          f"({r['perplexity_change_pct']:+.2f} %), rel logit err {q['rel_logit_err']:.3g}, "
          f"KL/token {q['kl_per_token']:.3g} over {q['tokens']} held-out tokens")
    if r["experts_without_calibration_tokens"]:
        print(f"{len(r['experts_without_calibration_tokens'])} experts saw no calibration tokens (scales taken from "
              "their weights and their layer's other experts): " + ", ".join(r["experts_without_calibration_tokens"][:8]))
    return 0


def _workers(v: str) -> int | str:
    if v == "auto":
        return v
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"a positive number or auto, not {v!r}")
    return int(v)


def _quant_options(sp) -> None:
    sp.add_argument("--calib-data", help="text file (paragraphs) or JSONL with a 'text' field; default: built in")
    sp.add_argument("--calib-size", type=int, default=128, help="calibration sequences")
    sp.add_argument("--calib-seq-len", type=int, default=512)
    sp.add_argument("--calib-batch-size", type=int, default=4)
    sp.add_argument("--eval-data", help="held-out text for the perplexity report; default: built in")
    sp.add_argument("--eval-size", type=int, default=8, help="held-out sequences")
    sp.add_argument("--export-hf", help="also write an HF deployment checkpoint here (fp8, nvfp4)")
    sp.add_argument("--quantize-output-layer", action="store_true", help="quantize the LM head too")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf2mcore", description="Hugging Face <-> Megatron-Core checkpoints")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, parallel=True):
        sp.add_argument("--family", help="treat the model as this family (for architectures not listed)")
        sp.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: HF2MCORE_DEBUG=1)")
        if parallel:
            for k in ("tp", "pp", "ep"):
                sp.add_argument(f"--{k}", type=int, default=1)
            sp.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: tp)")
            sp.add_argument("--exact", action="store_true",
                            help="also apply, through Megatron-LM's --spec hook, what its flags cannot express "
                                 "(each such gap is a WARNING line)")

    sp = sub.add_parser("inspect", help="print the Megatron settings derived from config.json")
    sp.add_argument("path", nargs="?", help="checkpoint directory or config.json (default: embedded SmolLM2)")
    sp.add_argument("--format", choices=("table", "json", "args"), default="table")
    common(sp)
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("convert", help="HF safetensors -> Megatron-LM torch_dist checkpoint")
    sp.add_argument("hf_dir", nargs="?", help="HF checkpoint directory (default: embedded SmolLM2)")
    sp.add_argument("out_dir", nargs="?", help="output directory (default: out/<model name>)")
    sp.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--verify", action="store_true", help="compare logits with HF after converting")
    sp.add_argument("--tol", type=float, default=1e-5)
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("--workers", type=_workers, default="auto",
                    help="N processes on this node share the reading and writing; default auto: one per 512 MiB "
                         "of output, at most one per core, 8, and what memory holds (across nodes: launch "
                         "`torchrun ... -m converter convert ...` instead)")
    sp.add_argument("--allow-nonfinite", action="store_true",
                    help="convert tensors holding NaN or Inf (by default they stop the conversion by name)")
    sp.add_argument("--no-mtp", action="store_true",
                    help="leave the multi-token-prediction layers out (DeepSeek-V3, GLM-4.5; said in the output)")
    sp.add_argument("--quantize", metavar="FORMAT", help="write a ModelOpt-quantized checkpoint instead (CUDA)")
    _quant_options(sp)
    common(sp)
    sp.set_defaults(fn=cmd_convert)

    sp = sub.add_parser("quantize", help="ModelOpt post-training quantization on CUDA, with a quality report")
    sp.add_argument("src", help="HF checkpoint directory or Megatron checkpoint")
    sp.add_argument("out_dir")
    sp.add_argument("--format", required=True, help="fp8, int8_sq, int4_awq, w4a8_awq, nvfp4 or an mtq config name")
    sp.add_argument("--like", help="HF directory (tokenizer, config) for a Megatron checkpoint source")
    sp.add_argument("--overwrite", action="store_true")
    _quant_options(sp)
    common(sp, parallel=False)
    sp.set_defaults(fn=cmd_quantize)

    sp = sub.add_parser("verify", help="compare Megatron-Core logits with HF transformers")
    sp.add_argument("hf_dir")
    sp.add_argument("mcore_dir")
    sp.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    sp.add_argument("--tol", type=float, default=1e-5, help="largest relative logit error accepted")
    common(sp, parallel=False)
    sp.set_defaults(fn=cmd_verify)

    sp = sub.add_parser("export", help="Megatron-Core torch_dist checkpoint -> HF safetensors")
    sp.add_argument("mcore_dir")
    sp.add_argument("out_dir")
    sp.add_argument("--like", help="HF directory whose config and tokenizer describe the model")
    sp.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
    sp.add_argument("--shard-size", default="5GB")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--no-progress", action="store_true")
    common(sp, parallel=False)
    sp.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    debug = a.debug or os.environ.get("HF2MCORE_DEBUG", "") not in ("", "0")
    install()  # SIGTERM / SIGINT: the cleanup runs, then one line and 143 / 130
    try:
        return _run(a)
    except BaseException as exc:
        if debug or isinstance(exc, SystemExit):
            raise
        stop = stopped(exc)
        if stop:
            print(f"hf2mcore: stopped by {stop}; nothing was published (the partial output was removed)",
                  file=sys.stderr)
            return stop.exit_code
        cause = root_failure(exc)
        # bad input and the environment (unreadable paths or files, a full disk, bad numbers) are the user's to fix
        # (and whatever stops torch from reading a checkpoint's files: they are corrupt or not a checkpoint)
        user = cause is not exc or isinstance(cause, (ConversionError, OSError, ValueError, EOFError,
                                                      pickle.UnpicklingError))
        print(f"hf2mcore: {'error' if user else 'internal error'}: {one_line(exc)}"
              + ("" if user else " (run with --debug for the traceback)"), file=sys.stderr)
        return 2 if user else 1


def _run(a) -> int:
    _quiet()
    from .imports import cache_bytecode

    cache_bytecode()  # before the imports it spares
    if a.command in ("inspect", "export") or (a.command == "convert" and not a.quantize):
        # File work only: no process (nor --workers rank) sets up CUDA or binds to a GPU it does not need.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if a.command == "convert" and a.hf_dir and not a.quantize:
        from .readahead import start
        from .replay import attempt

        hf = Path(a.hf_dir)
        start(hf)  # while the imports below run
        out = _out_dir(a, hf)
        # a source of a shape converted before: written without torch (replay.py)
        replayed = attempt(hf, out, _replay_options(a), overwrite=a.overwrite, progress=not a.no_progress)
        if replayed is not None:
            return _converted(a, hf, out, *replayed)
        from . import preplace

        # the source's tensors copied into the output while torch is imported (convert() ends it)
        preplace.start(hf, out, a.dtype, a.overwrite, check=not a.allow_nonfinite)
    if not (a.command == "inspect" and a.format != "json"):  # the others build a megatron-core model
        from .imports import import_megatron_eager

        import_megatron_eager()
    # what the imports allocated stays alive for the whole run: the collector need not scan it again (0.1-0.2 s)
    gc.freeze()
    return a.fn(a)


def run() -> None:
    """The console entry (`hf2mcore`, `python -m converter`): main, then leave without the interpreter's teardown.

    With torch and megatron-core loaded, tearing the interpreter down takes about 1 s after the work is done. When
    main returns, every output is already closed, synced and renamed into place.
    """
    rc = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    run()
