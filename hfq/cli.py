"""`hfq quantize | export | eval ppl | eval nuscenes | eval occupancy | push | demo`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _config_from_args(args):
    from .integration import config_from_dict
    from .recipe import build_config, load_recipe, parse_sets

    sets = parse_sets(getattr(args, "set", None))
    if getattr(args, "recipe", None):
        return load_recipe(args.recipe, sets)
    if getattr(args, "quantization_config", None):
        text = args.quantization_config
        data = json.loads(Path(text).read_text() if Path(text).is_file() else text)
        return config_from_dict({**data, **sets})
    if getattr(args, "method", None):
        return build_config(args.method, sets)
    if sets:
        raise SystemExit("--set needs --method, --recipe or --quantization-config")
    return None


def cmd_quantize(args):
    config = _config_from_args(args)
    if config is None:
        raise SystemExit("hfq quantize needs --method NAME [--set k=v ...], --recipe FILE or --quantization-config")
    from .models import load_model

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, config)
    seconds = time.perf_counter() - start
    metrics = None
    if args.eval_ppl:  # measured before saving, so the card carries it
        from .data.text import load_text
        from .eval.perplexity import perplexity

        r = perplexity(model, tokenizer, load_text(args.eval_ppl), 512, 0, 20, quiet=args.quiet)
        metrics = {"dataset": args.eval_ppl, "task": "text-generation", "results": {"perplexity": r["ppl"]},
                   "settings": f"Perplexity on {args.eval_ppl} (test split), windows 0-19 of 512 tokens "
                               f"({r['tokens']} predicted tokens), measured by `hfq quantize --eval-ppl`."}
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    from .eval.size import quantized_bytes
    from .model_card import write_model_card

    write_model_card(model, args.output, base_model=args.model, metrics=metrics,
                     recipe=Path(args.recipe).read_text() if getattr(args, "recipe", None) else None)
    print(json.dumps({"output": args.output, "quantize_seconds": round(seconds, 2), **quantized_bytes(model),
                      "quantization_config": config.to_dict(),
                      **({"perplexity": metrics["results"]["perplexity"]} if metrics else {})}))


def cmd_export(args):
    from .export import export_compressed_tensors, export_gguf
    from .models import load_model

    if args.format == "onnx":
        from .export.onnx import export as export_onnx, load_for_export

        if _config_from_args(args) is not None:
            raise ValueError("--format onnx exports a saved hfq vision checkpoint (quantize it first with its "
                             "calibration images, e.g. hfq.CFWSConfig / hfq.FQPETRConfig); --method / --recipe / "
                             "--quantization-config do not apply")
        path = export_onnx(load_for_export(args.model), args.output)
        print(json.dumps({"output": str(path), "format": "onnx"}))
        return

    if args.format == "gguf" and not args.output.endswith(".gguf"):
        raise ValueError(f"--format gguf writes one file: give --output a name ending in .gguf, not {args.output!r}")
    config = _config_from_args(args)  # None: MODEL is an hfq checkpoint, reloaded packed
    model, tokenizer = load_model(args.model, config)
    (export_gguf if args.format == "gguf" else export_compressed_tensors)(model, args.output, tokenizer=tokenizer)
    print(json.dumps({"output": args.output, "format": args.format}))


def cmd_eval_ppl(args):
    from .data.text import load_text
    from .eval.perplexity import perplexity
    from .models import load_model

    model, tokenizer = load_model(args.model, _config_from_args(args))
    result = perplexity(model, tokenizer, load_text(args.data), args.seq_len, args.first_window, args.max_windows,
                        quiet=args.quiet)
    print(json.dumps(result) if args.json else f"perplexity {result['ppl']:.3f} over {result['tokens']} tokens "
                                                f"({result['seconds']:.1f}s)")


def _vision_model(args):
    """MODEL as a folder path for the PyTorch backend, or the exported folder run by ONNX Runtime."""
    if args.backend == "pytorch":
        return args.model
    from .export.onnx import OnnxRuntimeModel

    return OnnxRuntimeModel(args.model, threads=args.threads)


def cmd_eval_nuscenes(args):
    from .eval.nuscenes import evaluate_detection

    result = evaluate_detection(_vision_model(args), args.data, split=args.split)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


def cmd_eval_occupancy(args):
    from .eval.occupancy import evaluate_model

    result = evaluate_model(_vision_model(args), args.data, split=args.split, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(f"{k}: {v}" for k, v in result.items() if k != "per_class"))


def cmd_push(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.folder)
    model.push_to_hub(args.repo_id, private=args.private)
    if (Path(args.folder) / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(args.folder).push_to_hub(args.repo_id, private=args.private)
    from huggingface_hub import upload_file

    from .model_card import render_model_card

    # our card replaces transformers' generic one; `hfq quantize` wrote it with the base model's name
    card = Path(args.folder) / "README.md"
    text = card.read_text() if card.is_file() else render_model_card(model, args.repo_id)
    upload_file(path_or_fileobj=text.replace(f'"{Path(args.folder).name}"', f'"{args.repo_id}"').encode(),
                path_in_repo="README.md", repo_id=args.repo_id, commit_message="hfq model card")
    print(f"pushed {args.folder} to {args.repo_id}")


def cmd_demo(args):
    from .demo import run_demo

    run_demo(output=args.output, max_windows=args.max_windows, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfq", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, config=True):
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        if config:
            source = sp.add_mutually_exclusive_group()  # one source of the config; --set refines it
            source.add_argument("--method", help="method name, e.g. rtn, gptq")
            source.add_argument("--recipe", help="YAML recipe (recipes/*.yaml)")
            source.add_argument("--quantization-config", help="JSON string or file with a quant_method")
            sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config field (repeatable)")

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help="local folder, Hub id, or an embedded model name (smollm2-135m)")
    q.add_argument("--output", required=True)
    q.add_argument("--eval-ppl", metavar="DATA", help="measure perplexity on DATA (wikitext2, a datasets name or a "
                                                      "text file; windows 0-19 of 512 tokens) into the model card")
    common(q)
    q.set_defaults(func=cmd_quantize)

    ex = sub.add_parser("export", help="write an hfq-quantized model in a format other tools load without hfq")
    ex.add_argument("model", help="an hfq-quantized folder (or any model with --method / --recipe to quantize first)")
    ex.add_argument("--format", required=True, choices=["compressed-tensors", "gguf", "onnx"],
                    help="onnx: hfq's quantized vision checkpoints (integer operators for ONNX Runtime)")
    ex.add_argument("--output", required=True)
    common(ex)
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="what", required=True)
    ppl = ev.add_parser("ppl", help="perplexity on non-overlapping windows")
    ppl.add_argument("model")
    ppl.add_argument("--data", default="wikitext2", help="wikitext2, a datasets name, or a local text file")
    ppl.add_argument("--seq-len", type=int, default=512)
    ppl.add_argument("--max-windows", type=int, default=None)
    ppl.add_argument("--first-window", type=int, default=0)
    ppl.add_argument("--json", action="store_true")
    common(ppl)
    ppl.set_defaults(func=cmd_eval_ppl)
    nus = ev.add_parser("nuscenes", help="nuScenes detection metrics (nuscenes-devkit DetectionEval)")
    nus.add_argument("model")
    nus.add_argument("--data", required=True, help="folder in nuScenes table format")
    nus.add_argument("--split", default="val")
    nus.add_argument("--json", action="store_true")
    common(nus, config=False)
    nus.set_defaults(func=cmd_eval_nuscenes)
    occ = ev.add_parser("occupancy", help="occupancy metrics (Occ3D mIoU with the camera mask, RayIoU, RayPQ)")
    occ.add_argument("model")
    occ.add_argument("--data", required=True, help="nuScenes-format folder with occupancy labels (write_occupancy)")
    occ.add_argument("--split", default="synthetic_val")
    occ.add_argument("--batch-size", type=int, default=2)
    occ.add_argument("--json", action="store_true")
    for sp in (nus, occ):
        sp.add_argument("--backend", choices=["pytorch", "onnxruntime"], default="pytorch",
                        help="onnxruntime: MODEL is a folder `hfq export --format onnx` wrote")
        sp.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    common(occ, config=False)
    occ.set_defaults(func=cmd_eval_occupancy)

    push = sub.add_parser("push", help="push a quantized folder to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    common(push, config=False)
    push.set_defaults(func=cmd_push)

    demo = sub.add_parser("demo", help="quantize SmolLM2-135M, save, reload, compare perplexity and size")
    demo.add_argument("--output", default=None, help="where to keep the quantized model (default: a temp folder)")
    demo.add_argument("--max-windows", type=int, default=20)
    common(demo, config=False)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .progress import set_quiet

    set_quiet(args.quiet)
    try:
        args.func(args)
    except (ValueError, TypeError, NotImplementedError, OSError) as e:  # OSError: a model path that is not there
        print(f"hfq: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
