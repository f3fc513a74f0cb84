"""Only the package map lives here: `quantizers/`, `modeling/` and `model_cards/` install as `hfq.quantizers`,
`hfq.modeling` and `hfq.model_cards`, so `hfq` is the one top-level import name. The rest is in pyproject.toml."""
from setuptools import find_packages, setup

MAPPED = {"hfq.quantizers": "quantizers", "hfq.modeling": "modeling", "hfq.model_cards": "model_cards"}
packages = find_packages(include=["hfq", "hfq.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir={"hfq": "hfq", **MAPPED}, package_data={"hfq.model_cards": ["*.md"]})
