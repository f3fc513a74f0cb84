"""Model card templates (Markdown with str.format fields), filled in by `hfq.model_card`."""
