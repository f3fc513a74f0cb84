"""Only the package map lives here: `quantizers/` and `modeling/` install as `hfq.quantizers` and
`hfq.modeling`, so `hfq` is the one top-level import name. Everything else is in pyproject.toml."""
from setuptools import find_packages, setup

MAPPED = {"hfq.quantizers": "quantizers", "hfq.modeling": "modeling"}
packages = find_packages(include=["hfq", "hfq.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir={"hfq": "hfq", **MAPPED})
