"""What every results JSON (benchmarks/, recipes/) carries about the run that wrote it, the atomic write of that
JSON, and its summary over seeds. The git commit is read from the source checkout hfq runs from (None when hfq is installed from a wheel)."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout, for an editable install


def run_info(threads: int) -> dict:
    """command line, git commit (+ "-dirty" when the tree has uncommitted changes), UTC date, threads, versions."""
    import torch
    import transformers

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = None
    if (ROOT / ".git").exists():
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")  # not outputs
        commit = git("rev-parse", "HEAD") + ("-dirty" if changed else "")
    command = " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    return {"command": command, "git_commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__}


def write_json(path, result: dict) -> None:
    """Write through a temporary file, so an interrupted run never leaves a half-written results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


def seed_summary(rows: dict, key: str = "ppl") -> dict:
    """Mean and sample std over seeds of `key` for rows named "<setting> seed<k>", by setting (rows without `key`
    are left out)."""
    import statistics

    groups: dict[str, list[float]] = {}
    for name, row in rows.items():
        if " seed" in name and key in row:
            groups.setdefault(name.rsplit(" seed", 1)[0], []).append(row[key])
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in groups.items()}
