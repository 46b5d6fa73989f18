"""opo_kernels: fused Triton kernels for the Orthogonalized Policy Optimization (OPO) loss.

    from opo_kernels import opo_loss
    loss = opo_loss(logits, labels, ref_logprobs, rewards, mask=mask, group_size=6)

The math contract is docs/spec.md; ``opo_kernels.reference``
is its plain-PyTorch form.
"""

from . import from_logprobs, reference, row_kernels, tp_combine
from .cache_keys import prehash
from .config import OPOLossConfig
from .epilogue import kernel as _epilogue
from .from_logprobs import opo_loss_from_logprobs
from .fused_linear_opo import FusedLinearOPOLoss, fused_linear_opo_loss
from .fused_opo import OPOLoss, opo_loss
from .utils import interpreter_on
from .validation import check_deferred

interpreter_on()  # remembered now that the kernels exist (read inside torch.compile's traces)
del interpreter_on

# every kernel's Triton cache key, independent of the order of first launches (cache_keys.py)
prehash(row_kernels._opo_fwd_kernel, row_kernels._opo_bwd_kernel, row_kernels._scale_kernel,
        from_logprobs._logprob_grad_kernel, tp_combine._combine_kernel,
        _epilogue.epilogue_kernel)
del prehash

__all__ = ["FusedLinearOPOLoss", "OPOLoss", "OPOLossConfig", "check_deferred",
           "fused_linear_opo_loss", "opo_loss", "opo_loss_from_logprobs", "reference"]
__version__ = "0.1.0"
