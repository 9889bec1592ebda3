"""Install pcrlv2_fast; kernels/ ships as the subpackage pcrlv2_fast.kernels."""

from setuptools import find_packages, setup

packages = find_packages(include=["pcrlv2_fast", "pcrlv2_fast.*"]) + ["pcrlv2_fast.kernels"]

setup(
    name="pcrlv2_fast",
    version="0.1.0",
    description="Fast, checkpoint-compatible PCRLv2 self-supervised pretraining for 3D CT/MR volumes",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"pcrlv2_fast": "pcrlv2_fast", "pcrlv2_fast.kernels": "kernels"},
    install_requires=[
        # 2.9.0 disables cuDNN for half-precision 3D convolutions.
        "torch>=2.4,!=2.9.0",
        "numpy>=1.24",
        "SimpleITK>=2.2",
        "tqdm>=4.60",
        "matplotlib>=3.6",
    ],
    extras_require={
        "dev": ["pytest>=7", "ruff>=0.5", "triton>=3.0", "torchio>=0.19"],
        "dali": ["nvidia-dali-cuda120"],
    },
    entry_points={"console_scripts": ["pcrlv2-fast=pcrlv2_fast.cli:main"]},
)
