"""Text corpora for evaluation and calibration: the Hub through `datasets` when it is reachable, local files
otherwise. WikiText-2 test is looked up in `$HFQ_DATA_DIR/wikitext-2-raw/wiki.test.raw` first."""
from __future__ import annotations

import os
from pathlib import Path

# name -> (local file under HFQ_DATA_DIR, datasets arguments, text column)
KNOWN_TEXTS = {
    "wikitext2": ("wikitext-2-raw/wiki.test.raw", ("Salesforce/wikitext", "wikitext-2-raw-v1"), "text"),
}


def load_text(name_or_path: str, split: str = "test") -> str:
    """Return one evaluation string. Rows are joined with "\\n\\n", the usual WikiText-2 protocol."""
    path = Path(name_or_path)
    if path.is_file():
        return _join(path.read_text(encoding="utf-8").splitlines())
    if name_or_path in KNOWN_TEXTS:
        local, hub_args, column = KNOWN_TEXTS[name_or_path]
        data_dir = os.environ.get("HFQ_DATA_DIR")
        if data_dir and (Path(data_dir) / local).is_file():
            return _join((Path(data_dir) / local).read_text(encoding="utf-8").splitlines())
        return _join(_load_hub(hub_args, split, column))
    return _join(_load_hub((name_or_path,), split, "text"))


def _join(rows) -> str:
    return "\n\n".join(r for r in rows if r.strip())


def _load_hub(args, split, column):
    import datasets

    try:
        ds = datasets.load_dataset(*args, split=split)
    except Exception as e:  # offline, unknown name, ...
        raise ValueError(
            f"could not load dataset {args[0]!r} ({type(e).__name__}: {e}). Pass a local text file path, or set "
            f"HFQ_DATA_DIR to a folder holding wikitext-2-raw/wiki.test.raw"
        ) from e
    if column not in ds.column_names:
        raise ValueError(f"dataset {args[0]!r} has no {column!r} column (columns: {ds.column_names})")
    return ds[column]
