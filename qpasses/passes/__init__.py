"""Built-in passes. Each module holds one pass; this tuple is what the registry loads."""

from qpasses.passes.adaround import AdaRound
from qpasses.passes.adascale import AdaScale
from qpasses.passes.annotate_precision import AnnotatePrecision
from qpasses.passes.apply_overrides import ApplyOverrides
from qpasses.passes.bias_correction import BiasCorrection
from qpasses.passes.calibrate import Calibrate
from qpasses.passes.check_target import CheckTarget
from qpasses.passes.cross_layer_equalization import CrossLayerEqualization
from qpasses.passes.data_independent import KeepDataIndependentFloat
from qpasses.passes.dead_code import DeadCodeElimination
from qpasses.passes.decomposed_blocks import KeepDecomposedBlocksFloat
from qpasses.passes.encode_weights import EncodeWeights
from qpasses.passes.fold_batchnorm import FoldBatchNorm
from qpasses.passes.identity_elimination import IdentityElimination
from qpasses.passes.inline_functions import InlineFunctions
from qpasses.passes.insert_converts import InsertConverts
from qpasses.passes.int32_overrides import Int32Overrides
from qpasses.passes.keep_float_tensors import KeepFloat
from qpasses.passes.log_domain_inputs import KeepLogDomainInputsFloat
from qpasses.passes.mixed_ranges import KeepMixedRangesFloat
from qpasses.passes.non_finite_constants import KeepNonFiniteFloat
from qpasses.passes.opset_upgrade import UpgradeOpset
from qpasses.passes.portable_storage import PortableStorage
from qpasses.passes.qdq_lowering import QDQLowering
from qpasses.passes.rewrite_script import RewriteScript
from qpasses.passes.runtime_parity_check import RuntimeParityCheck
from qpasses.passes.seq_mse import SeqMSE
from qpasses.passes.shape_inference import InferShapes

BUILTIN_PASSES = (
    # graph cleanup and interop
    DeadCodeElimination, IdentityElimination, InferShapes, InlineFunctions, RewriteScript, UpgradeOpset,
    # FP32-preserving rewrites
    FoldBatchNorm, CrossLayerEqualization,
    # quantization: annotate, encode, calibrate, lower
    ApplyOverrides, KeepNonFiniteFloat, KeepLogDomainInputsFloat,
    KeepDataIndependentFloat, KeepDecomposedBlocksFloat, KeepMixedRangesFloat,
    KeepFloat, AnnotatePrecision,
    CheckTarget, Int32Overrides,
    SeqMSE, AdaRound, AdaScale, EncodeWeights, Calibrate,
    BiasCorrection, QDQLowering, InsertConverts, PortableStorage,
    # checks
    RuntimeParityCheck,
)

__all__ = ["BUILTIN_PASSES"]
