"""What the official-checkpoint converters of `hfq.modeling` share (converters run where hfq is installed; the
shipped model code never imports this)."""


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
