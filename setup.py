from setuptools import find_packages, setup

setup(
    name="opo_kernels",
    version="0.1.0",
    description="Fused Triton kernels for the Orthogonalized Policy Optimization (OPO) loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["opo_kernels", "opo_kernels.*"]),
    python_requires=">=3.9",
    # torch is deliberately unpinned here: CI pre-installs the build the machine allows
    # (see .ci/run); an unpinned fresh install would pull the CUDA wheels.
    install_requires=["torch>=2.4", "triton>=3.4", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff"],
        "demo": ["matplotlib", "tqdm"],
    },
)
