"""Refactor check: does hfq GPTQ at this checkout give the same integers and scales as at an earlier commit?

    python benchmarks/gptq_same_integers.py --base a045231   [--threads 1]
        -> benchmarks/results/gptq_same_integers.json

Setting of benchmarks/gptq_vs_llmcompressor.py: real SmolLM2-135M, W4 group 64 symmetric, act-order with static
groups, damp 0.01, block 128, 32 x 512 WikiText-2 calibration windows (`from_dataset`, seed 0), default
(lockstep) order. Each side runs in its own process: the base commit from a `git worktree` imported in place of the
installed package (its `quantizers/` and `modeling/` mapped to `hfq.quantizers` / `hfq.modeling` as setup.py does).
Every QuantLinear's integer weights (`int_weight()`) and scales are compared exactly.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(package_root: str | None, out: str, threads: int):
    if package_root:  # import the base commit instead of the installed (editable) hfq
        sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
        sys.path.insert(0, package_root)
    import torch
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    import hfq
    from hfq.calibration import from_dataset
    from hfq.models import resolve
    from hfq.nn import QuantLinear
    from hfq.progress import set_quiet

    set_quiet(True)
    path = resolve("smollm2-135m")
    ids = from_dataset("wikitext2", path, n_samples=32, seq_len=512, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = hfq.GPTQConfig(bits=4, group_size=64, sym=True, act_order=True, damp=0.01, block_size=128, n_samples=32,
                         seq_len=512)
    hfq.quantize(model, cfg, calibration=ids)
    q = {n: (m.int_weight().to(torch.int8), m.weight_scale.detach().clone()) for n, m in model.named_modules()
         if isinstance(m, QuantLinear)}
    torch.save({"hfq": hfq.__file__, "ids": ids, "q": q}, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="the earlier commit (required)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gptq_same_integers.json"))
    ap.add_argument("--worker", nargs=2, metavar=("PACKAGE_ROOT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0] or None, args.worker[1], args.threads)
    if not args.base:
        ap.error("--base COMMIT is required")
    import torch

    from hfq.eval.provenance import run_info, write_json  # not at the top: the base worker must import its own hfq

    info = run_info(args.threads)  # at the start: the commit whose code runs
    with tempfile.TemporaryDirectory() as tmp:
        tree, pkg = Path(tmp) / "tree", Path(tmp) / "pkg"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), args.base], cwd=ROOT, check=True)
        try:
            base_commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True,
                                         check=True).stdout.strip()
            pkg.mkdir()
            shutil.copytree(tree / "hfq", pkg / "hfq")
            for sub in ("quantizers", "modeling", "model_cards"):  # setup.py's package map, without installing
                if (tree / sub).exists():
                    (pkg / "hfq" / sub).symlink_to(tree / sub)
            runs = {}
            for side, root in (("head", ""), ("base", str(pkg))):
                out = Path(tmp) / f"{side}.pt"
                subprocess.run([sys.executable, __file__, "--worker", root, str(out), "--threads", str(args.threads)],
                               check=True)
                runs[side] = torch.load(out)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    head, base = runs["head"]["q"], runs["base"]["q"]
    if head.keys() != base.keys():
        raise SystemExit(f"different quantized layers: {sorted(set(head) ^ set(base))[:5]}")
    ints = [n for n in head if not torch.equal(head[n][0], base[n][0])]
    scales = [n for n in head if not torch.equal(head[n][1], base[n][1])]
    result = {"setting": {"model": "smollm2-135m", "bits": 4, "group_size": 64, "act_order": "static", "damp": 0.01,
                          "block_size": 128, "calibration": "wikitext2 32 x 512, seed 0", "order": "lockstep"},
              "base_commit": base_commit, "imported": {k: v["hfq"] for k, v in runs.items()},
              "same_calibration_ids": bool(torch.equal(runs["head"]["ids"], runs["base"]["ids"])),
              "layers": len(head), "layers_with_other_integers": ints, "layers_with_other_scales": scales,
              **info}
    write_json(args.output, result)
    print(f"{len(head)} layers: {len(ints)} with other integers, {len(scales)} with other scales "
          f"(base {base_commit[:7]} vs {result['git_commit'][:7]})")


if __name__ == "__main__":
    main()
