"""What the official-checkpoint converters of `hfq.modeling` share (converters run where hfq is installed; the
shipped model code never imports this)."""
import re


def match_table(name: str, table) -> str | None:
    """The renamed `name` by the first (regex, replacement template) of `table` that fully matches it, else None."""
    for pattern, template in table:
        m = re.fullmatch(pattern, name)
        if m:
            return m.expand(template)
    return None


def rename_keys(state_dict: dict, map_key) -> tuple[dict, list[str]]:
    """({map_key(k): v} for the keys map_key knows, [the keys it returned None for])."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = map_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    return out, unknown


def check_converted(converted: dict, model, keys_hint: str, sizes_hint: str) -> None:
    """Refuse a converted state dict that does not fit `model` (built from the target config, e.g. on the meta
    device): missing or unexpected keys first, then shape mismatches; each error ends with the caller's hint."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    if missing or extra:
        raise ValueError(f"converted checkpoint does not fit the config: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {extra[:5]} ({len(extra)}); {keys_hint}")
    bad = [(k, tuple(converted[k].shape), tuple(s)) for k, s in expected.items()
           if tuple(converted[k].shape) != tuple(s)]
    if bad:
        raise ValueError(f"shape mismatches (key, checkpoint, model): {bad[:5]}; {sizes_hint}")
