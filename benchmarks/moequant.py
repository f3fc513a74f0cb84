"""MoEQuant vs GPTQ vs RTN (and llm-compressor's GPTQ) on tiny byte-level MoE LMs trained here, W4 and W3.

    python benchmarks/moequant.py [--archs mixtral,qwen3_moe] [--bits 4,3] [--seeds 0,1,2]
        [--methods rtn,gptq,gptq_ebss,gptq_agq,moequant,quarot_gptq,moequant_pp,llmc_gptq,llmc_gptq_routed,
                   gptq_symhalf,moequant_symhalf,gptq_ctgrid,moequant_ctgrid]
        [--n-samples 32] [--seq-len 512] [--train-steps 1200] [--threads N] [--resume] [--quiet]
        -> prints a table, writes benchmarks/results/moequant.json (rewritten after every row)

- Models: a Mixtral-style and a Qwen3-MoE-style decoder (8 experts, top-2, 4 layers, hidden 256, expert width 256,
  ~7.5M parameters, byte-level: vocabulary 256, one token per UTF-8 byte), trained here from seed 0 with AdamW
  (lr 2e-3, warm-up 100 steps, cosine) on batches of 4 x 512 bytes (the evaluation's window length, so every
  evaluated position was trained) of WikiText-2 test text after byte 40960 (the
  evaluation windows and the validation range come before it), with the models' own router load-balancing loss
  (router_aux_loss_coef 0.001). Cached in the git-ignored runs/moequant/ (keyed by architecture, steps, seed).
- `--corpus wikitext+python`: a second pair of models trained on two domains, WikiText-2 (as above) and Python
  source (this interpreter's standard library, top-level *.py files sorted by name; every 10th file is held out for
  evaluation, the others are training text; the result records the Python version and a hash of both texts). Each
  training batch holds 2 windows of each. Calibration stays WikiText (as in the paper, which calibrates on WikiText
  and evaluates on other domains, e.g. HumanEval), so experts that serve code see few calibration tokens: the
  setting EBSS is for. Rows then carry `ppl_code` too (held-out Python windows, same numbering as WikiText's).
- Perplexity: bytes 0..10239 (windows 0-19 of 512 bytes); lower is better.
- Weights: per-channel symmetric (the paper's W4 setting; W3 too), lm_head, embeddings and routers float.
  rtn: min-max round to nearest. gptq: hfq GPTQ on `n_samples` x `seq_len` WikiText-2 windows (after byte 40960),
  damp 0.01, no act-order, MSE clip (the released MoEQuant setting). gptq_ebss: the same GPTQ on EBSS samples.
  gptq_agq: WikiText windows, expert Hessians weighted by routing weights. moequant: EBSS + AGQ. quarot_gptq:
  random Hadamard R1 + R2, then GPTQ on WikiText. moequant_pp: MoEQuant++ = rotation + EBSS + AGQ (the released
  configuration). llmc_gptq: llm-compressor's GPTQModifier in its own venv (.venv-llmc) on the same WikiText
  calibration ids, same grid, its MSE observer, scored in its process by hfq's evaluator file. It linearizes the
  fused experts and, by its default (moe_calibrate_all_experts=True), sends EVERY calibration token through every
  expert, so each expert's Hessian comes from all tokens; the row records how many modules it quantized.
  llmc_gptq_routed: the same with moe_calibrate_all_experts=False (each expert sees its routed tokens, as hfq).
  gptq_symhalf / moequant_symhalf: gptq / moequant with hfq's sym_scale="half" (max|w| maps to 2^(b-1) - 1/2, the
  GPTQ reference's and compressed-tensors' rule) instead of the default "max" (QuaRot's). gptq_ctgrid /
  moequant_ctgrid: also mse_max_shrink=0.2, i.e. compressed-tensors' MSE observer (the range shrunk by at most 20%).
- EBSS at CPU scale: `n_samples` x `seq_len` bytes (the paper: 128 x 512 tokens), tau 1.2, beam width 4, 64
  candidate tokens per beam, 3 sampled prefix tokens; samples are cached (runs/moequant/ebss) and shared by every
  EBSS row of the same model and seed. `--ebss-tau` changes tau (choose it with `--eval-on validation`).
- Seeds: seed s = calibration draw s (WikiText windows; EBSS first tokens) and rotation seed s. The trained model is
  the same for every seed. `summary`: mean and sample std over seeds per method, architecture and bits.
- Coverage: per model and seed, tokens per expert (min / median / max over experts and layers) and the mean std of
  expert usage for the WikiText calibration set and for the EBSS set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tiny_lm import TRAIN_START, ByteTokenizer, train_cached, windows

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "moequant"
METHODS = ("rtn", "gptq", "gptq_ebss", "gptq_agq", "moequant", "quarot_gptq", "moequant_pp", "llmc_gptq",
           "llmc_gptq_routed", "gptq_symhalf", "moequant_symhalf", "gptq_ctgrid", "moequant_ctgrid")


def model_config(arch: str):
    common = dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False, num_experts_per_tok=2,
                  router_aux_loss_coef=0.001, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(**common, intermediate_size=256, num_local_experts=8)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**common, head_dim=64, intermediate_size=1024, moe_intermediate_size=256,
                              num_experts=8, norm_topk_prob=True)
    raise SystemExit(f"unknown architecture {arch!r}; known: mixtral, qwen3_moe")


def python_corpus() -> tuple[str, str, dict]:
    """(training text, held-out evaluation text, provenance) from this interpreter's standard library."""
    import hashlib
    import platform
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if len(files) < 50:
        raise SystemExit(f"--corpus wikitext+python needs Python's standard library sources; found {len(files)} "
                         f"*.py files in {sysconfig.get_paths()['stdlib']}")

    def read(fs):
        return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in fs)

    train = read([f for i, f in enumerate(files) if i % 10])
    held_out = read([f for i, f in enumerate(files) if i % 10 == 0])
    return train, held_out, {"python": platform.python_version(), "files": len(files),
                             "train_bytes": len(train.encode()), "held_out_bytes": len(held_out.encode()),
                             "sha256": hashlib.sha256((train + "\0" + held_out).encode()).hexdigest()[:16]}


def train_model(arch: str, steps: int, text_ids: torch.Tensor, quiet: bool, code_ids: torch.Tensor | None = None
                ) -> Path:
    """The tiny MoE LM, trained once and cached (on WikiText, or on WikiText and Python source when code_ids)."""
    from transformers import AutoModelForCausalLM

    corpus = "" if code_ids is None else "wikitext+python-"
    path = RUNS / f"{arch}-{corpus}steps{steps}-4x512-seed0"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    cfg = model_config(arch)
    cfg.output_router_logits = True  # the load-balancing loss joins the LM loss
    model = AutoModelForCausalLM.from_config(cfg)
    data = text_ids[TRAIN_START:]

    def sample(g):
        if code_ids is None:
            return torch.stack(windows(data, 4, g))
        return torch.stack(windows(data, 2, g) + windows(code_ids, 2, g))  # 2 windows of each domain

    return train_cached(path, model, sample, steps, 2e-3, quiet, f"train {arch}",
                        finalize=lambda m: setattr(m.config, "output_router_logits", False))


def build_config(method: str, bits: int, seed: int, args):
    import hfq

    common = dict(bits=bits, group_size=None, sym=True, n_samples=args.n_samples, seq_len=args.seq_len, seed=seed,
                  tokenizer=ByteTokenizer())
    if method == "rtn":
        return hfq.RTNConfig(bits=bits, group_size=None, sym=True)
    if method.endswith("_symhalf"):  # not the papers' setting: hfq's sym_scale="half" (the GPTQ reference's rule)
        common["sym_scale"] = "half"
        method = method[: -len("_symhalf")]
    if method.endswith("_ctgrid"):  # not the papers' setting: compressed-tensors' weight grid and MSE search
        common.update(sym_scale="half", mse_max_shrink=0.2)
        method = method[: -len("_ctgrid")]
    if method == "gptq":
        return hfq.GPTQConfig(**common, act_order=False, mse_clip=True, damp=0.01, dataset="wikitext2")
    ebss = dict(ebss_cache_dir=RUNS / "ebss", ebss_tau=args.ebss_tau)
    variants = {"gptq_ebss": dict(ebss=True, affinity=False, rotate=False, **ebss),
                "gptq_agq": dict(ebss=False, affinity=True, rotate=False, dataset="wikitext2"),
                "moequant": dict(ebss=True, affinity=True, rotate=False, **ebss),
                "quarot_gptq": dict(ebss=False, affinity=False, rotate=True, dataset="wikitext2"),
                "moequant_pp": dict(ebss=True, affinity=True, rotate=True, **ebss)}
    return hfq.MoEQuantConfig(**common, **variants[method])


# ---------------------------------------------------------------- the peer, in .venv-llmc
def worker_llmc(args):
    """llm-compressor's GPTQ on the saved float model and the given calibration ids, scored right here by hfq's
    evaluator file (the peer's venv has no hfq)."""
    import importlib.util

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("perplexity", ROOT / "hfq" / "eval" / "perplexity.py")
    evaluator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluator)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = torch.load(args.calibration)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=args.worker_bits, type="int", symmetric=True, strategy="channel",
                               observer="mse")
    recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head", "re:.*mlp.gate$"], dampening_frac=0.01, block_size=128)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    # llm-compressor wants a processor whenever a dataset is given; the ids are already tokenized, so a 256-entry
    # stand-in with the model's vocabulary size is all it needs
    processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"<{i}>": i for i in range(256)}, unk_token="<0>")))
    start = time.perf_counter()
    oneshot(model=model, processor=processor, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False,
            moe_calibrate_all_experts=bool(args.all_experts))
    seconds = time.perf_counter() - start
    quantized = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]
    text = Path(args.text).read_text(encoding="utf-8")
    ppl = evaluator.perplexity(model, ByteTokenizer(), text, 512, args.first_window, 20, quiet=True)["ppl"]
    code = {}
    if args.code_text:
        code_text = Path(args.code_text).read_text(encoding="utf-8")
        code["ppl_code"] = evaluator.perplexity(model, ByteTokenizer(), code_text, 512, args.first_window, 20,
                                                quiet=True)["ppl"]
    print("RESULT " + json.dumps({"ppl": ppl, **code, "quantize_s": round(seconds, 1), "quantized_modules": len(quantized),
                                  "quantized_expert_modules": sum("experts" in n for n in quantized)}), flush=True)


def run_peer(model_path: Path, calib: torch.Tensor, bits: int, args, text: str, first: int,
             all_experts: bool = True, code_text: str | None = None) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gptq_vs_llmcompressor import ensure_peer_venv, run_reporting

    py = ensure_peer_venv()
    work = RUNS / "peer"
    work.mkdir(parents=True, exist_ok=True)
    torch.save(calib, work / "calibration_ids.pt")
    (work / "text.txt").write_text(text, encoding="utf-8")
    cmd = [str(py), __file__, "--worker-bits", str(bits), "--model", str(model_path), "--calibration",
           str(work / "calibration_ids.pt"), "--text", str(work / "text.txt"), "--threads", str(args.threads),
           "--first-window", str(first), "--all-experts", str(int(all_experts))]
    if code_text is not None:
        (work / "code.txt").write_text(code_text, encoding="utf-8")
        cmd += ["--code-text", str(work / "code.txt")]
    return run_reporting(cmd, dict(os.environ), f"llm-compressor GPTQ W{bits}")


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="mixtral,qwen3_moe")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=1200)
    ap.add_argument("--corpus", default="wikitext", choices=["wikitext", "wikitext+python"],
                    help="what the tiny models are trained on (calibration is WikiText either way)")
    ap.add_argument("--ebss-tau", type=float, default=1.2, help="EBSS temperature (the paper's 1.2)")
    ap.add_argument("--eval-on", default="test", choices=["test", "validation"],
                    help="test: bytes 0-10239 (the reported figures); validation: windows 20-39 (bytes 10240-20479), "
                         "for choosing hyper-parameters")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "moequant.json"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --output (same settings)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--worker-bits", type=int, help=argparse.SUPPRESS)  # the peer's process
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--calibration", help=argparse.SUPPRESS)
    ap.add_argument("--text", help=argparse.SUPPRESS)
    ap.add_argument("--first-window", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--all-experts", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--code-text", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_bits:
        return worker_llmc(args)

    os.environ.setdefault("HFQ_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    from transformers import AutoModelForCausalLM

    import hfq
    from hfq.calibration import from_dataset
    from hfq.calibration.ebss import expert_coverage
    from hfq.data.text import load_text
    from hfq.eval.perplexity import perplexity
    from hfq.eval.provenance import run_info, write_json
    from hfq.progress import set_quiet

    set_quiet(args.quiet)
    torch.set_num_threads(args.threads)
    info = run_info(torch.get_num_threads())
    archs, seeds = args.archs.split(","), [int(s) for s in args.seeds.split(",")]
    bits_list, methods = [int(b) for b in args.bits.split(",")], args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {METHODS}")
    tok = ByteTokenizer()
    text = load_text("wikitext2")
    text_ids = tok(text).input_ids[0]
    first = 0 if args.eval_on == "test" else 20
    code_train = code_text = None
    if args.corpus == "wikitext+python":
        code_train, code_text, code_info = python_corpus()
    settings = {"calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len}, "ebss_tau": args.ebss_tau,
                "corpus": args.corpus if code_text is None else {"name": args.corpus, "python_source": code_info},
                "train_steps": args.train_steps, "eval": {"dataset": "wikitext2 test", "unit": "byte",
                                                          "seq_len": 512, "windows": f"{first}-{first + 19}"}}
    out = Path(args.output)
    result = {**settings, "rows": {}, "coverage": {}, "models": {}}
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if any(old.get(k, "wikitext" if k == "corpus" else None) != v for k, v in settings.items()):  # older files
            # have no "corpus": they are WikiText-only
            raise SystemExit(f"{out} was written with other settings; drop --resume or pass the same flags")
        result.update(rows=old["rows"], coverage=old.get("coverage", {}), models=old.get("models", {}))

    def evaluate(model) -> dict:
        out = {"ppl": perplexity(model, tok, text, 512, first, 20, quiet=True)["ppl"]}
        if code_text is not None:
            out["ppl_code"] = perplexity(model, tok, code_text, 512, first, 20, quiet=True)["ppl"]
        return out

    for arch in archs:
        path = train_model(arch, args.train_steps, text_ids, args.quiet,
                           None if code_train is None else tok(code_train).input_ids[0])
        result["models"][arch] = json.loads((path / "training.json").read_text())

        def load():
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

        if f"{arch} FP32" not in result["rows"]:
            result["rows"][f"{arch} FP32"] = {**evaluate(load()), **info}
            write_json(out, result)
        for seed in seeds:
            wiki = from_dataset("wikitext2", tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=seed)
            for bits in bits_list:
                for method in methods:
                    name = f"{arch} {method} w{bits} seed{seed}"
                    if name in result["rows"] or (method == "rtn" and seed != seeds[0]):
                        continue  # rtn has no seed
                    if method.startswith("llmc_gptq"):
                        row = run_peer(path, wiki, bits, args, text, first, all_experts=method == "llmc_gptq",
                                       code_text=code_text)
                    else:
                        model = load()
                        start = time.perf_counter()
                        hfq.quantize(model, build_config(method, bits, seed, args), calibration=None)
                        row = {**evaluate(model), "quantize_s": round(time.perf_counter() - start, 1)}
                        cov = getattr(model.hf_quantizer, "coverage", None)
                        if cov is not None and method in ("gptq_ebss", "moequant"):
                            key = f"{arch} seed{seed} ebss"
                            result["coverage"].setdefault(key, {k: v for k, v in cov.items() if k != "counts"})
                    result["rows"][name] = {**row, **info}
                    print(f"{name} {row['ppl']:.4f}" + (f" code {row['ppl_code']:.4f}" if "ppl_code" in row else ""),
                          flush=True)
                    write_json(out, result)
            key = f"{arch} seed{seed} wikitext"
            if key not in result["coverage"]:
                cov = expert_coverage(load(), list(wiki))
                result["coverage"][key] = {k: v for k, v in cov.items() if k != "counts"}
                write_json(out, result)
    result["summary"] = summarize(result["rows"])
    write_json(out, result)
    print_table(result, archs, bits_list)


def summarize(rows: dict) -> dict:
    """Mean and sample std over seeds of each method / architecture / bits (`code`: the same for ppl_code, where every
    seed has it)."""
    from hfq.eval.provenance import seed_summary

    out, code = seed_summary(rows), seed_summary(rows, "ppl_code")
    for k, c in code.items():
        if c["n"] == out[k]["n"]:
            out[k]["code"] = c
    return out


def print_table(result, archs, bits_list):
    print(f"\nbyte-level PPL, windows {result['eval']['windows']} of 512 bytes (mean +- std over seeds); WikiText-2 "
          f"test, then held-out Python source where the models were trained on it")
    for arch in archs:
        fp = result["rows"][f"{arch} FP32"]
        print(f"{arch}: FP32 {fp['ppl']:.4f}" + (f" / code {fp['ppl_code']:.4f}" if "ppl_code" in fp else ""))
        for method in METHODS:
            cells = []
            for bits in bits_list:
                r = result["summary"].get(f"{arch} {method} w{bits}")
                if r:
                    cell = f"W{bits} {r['mean']:.4f} +- {r['std']:.4f}"
                    if "code" in r:
                        cell += f" / code {r['code']['mean']:.4f} +- {r['code']['std']:.4f}"
                    cells.append(cell + f" (n={r['n']})")
            if cells:
                print(f"  {method:<18}" + "   ".join(cells))
        for key, cov in result["coverage"].items():
            if key.startswith(arch + " "):
                print(f"  coverage {key}: min tokens/expert {cov['min_tokens']}, mean usage std {cov['mean_std']:.4f}")


if __name__ == "__main__":
    main()
