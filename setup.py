"""Build script. Pure Python today; the csrc/ kernels will be added here as torch C++/CUDA extensions.

Install for development with ``pip install --no-build-isolation -e .[test]`` after installing torch, so
that a later extension build compiles against the torch already in the environment instead of pulling
another one into an isolated build environment.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="lowrank_optim",
    version="0.1.0",
    description="Memory-efficient pretraining optimizers (GaLore, Fira, DCT, SLTrain) as drop-ins for AdamW",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["lowrank_optim", "lowrank_optim.*"]),
    package_data={"lowrank_optim": ["configs/**/*.json"]},
    # A range that the torch==2.13.0 CPU wheel satisfies, so pip never swaps in another build.
    install_requires=["torch>=2.4,<2.15", "numpy"],
    extras_require={"test": ["pytest>=8", "scipy"]},
    entry_points={"console_scripts": ["lowrank-optim=lowrank_optim.__main__:main"]},
)
