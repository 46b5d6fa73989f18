from setuptools import find_packages, setup

setup(
    name="opo_kernels",
    version="0.1.0",
    description="Fused Triton kernels for the Orthogonalized Policy Optimization (OPO) loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["opo_kernels", "opo_kernels.*"]),
    python_requires=">=3.10",  # what torch 2.13 supports (its wheels: cp310 and newer)
    # torch is deliberately unpinned here: CI pre-installs the build the machine allows
    # (see .ci/run); an unpinned fresh install would pull the CUDA wheels.
    install_requires=["torch>=2.4", "triton>=3.4", "numpy"],
    extras_require={
        # matplotlib and tqdm: the demo's smoke test runs in CI; pytest-xdist: CI runs the
        # suite on both cores (-n auto)
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "matplotlib",
                 "tqdm"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff"],
        "demo": ["matplotlib", "tqdm"],
        # the benchmarks' peers (benchmarks/peers.py; their tests run in CI): the versions measured
        "bench": ["cut-cross-entropy==25.1.1", "liger-kernel==0.8.5", "trl>=1.16,<1.17",
                  "matplotlib", "pytest-benchmark"],
        # opo_kernels.integrations.trl overrides private GRPOTrainer methods: the range is the
        # one its tests passed on (trl 0.29.1, 1.0.0, 1.8.0, 1.16.0)
        "trl": ["trl>=0.29.1,<1.17"],
        # opo_kernels.integrations.verl (verl's registries and actor as of 0.9.1; tested with
        # 0.9.1). verl itself leaves torch unpinned, so the installed CPU/CUDA build is kept.
        # cachetools/fastapi/uvicorn: verl.trainer.ppo.ray_trainer (compute_advantage, used by
        # the tests) imports them, but they are only in verl's heavy "verl-core" extra.
        # transferqueue: verl's default (v1) trainer imports it; the tests of OPO's
        # group-preserving balancing in that trainer need it.
        "verl": ["verl>=0.9.1,<0.10", "cachetools", "fastapi", "uvicorn",
                 "transferqueue>=0.1.11"],
    },
    # verl imports every "verl.plugins" entry point on `import verl`, in the driver and in each
    # Ray worker: this registers the opo_kernels estimator and policy loss there.
    entry_points={"verl.plugins": ["opo_kernels = opo_kernels.integrations.verl"]},
)
