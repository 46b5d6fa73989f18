"""Trainer integrations. Each lives in its own module and imports its framework only there, so
``import opo_kernels`` never needs them:

    from opo_kernels.integrations.trl import OPOConfig, OPOTrainer   # needs `pip install .[trl]`
"""
