"""What every results JSON (benchmarks/, recipes/) carries about the run that wrote it, and the atomic write of that
JSON. The git commit is read from the source checkout hfq runs from (None when hfq is installed from a wheel)."""
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
