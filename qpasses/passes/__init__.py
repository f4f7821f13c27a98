"""Built-in passes. Each module holds one pass; this tuple is what the registry loads."""

from qpasses.core.registry import Registry, load_entry_points
from qpasses.passes.cleanup.dead_code import DeadCodeElimination
from qpasses.passes.cleanup.identity_elimination import IdentityElimination
from qpasses.passes.cleanup.inline_functions import InlineFunctions
from qpasses.passes.cleanup.opset_upgrade import UpgradeOpset
from qpasses.passes.cleanup.rewrite_script import RewriteScript
from qpasses.passes.cleanup.shape_inference import InferShapes
from qpasses.passes.cleanup.transpose_sinking import SinkTransposes
from qpasses.passes.equalize.bias_correction import BiasCorrection
from qpasses.passes.equalize.cross_layer_equalization import CrossLayerEqualization
from qpasses.passes.equalize.fold_batchnorm import FoldBatchNorm
from qpasses.passes.equalize.fold_channel_affine import FoldChannelAffine
from qpasses.passes.equalize.fold_matmul_bias import FoldMatMulBias
from qpasses.passes.fallback.data_independent import KeepDataIndependentFloat
from qpasses.passes.fallback.decomposed_blocks import KeepDecomposedBlocksFloat
from qpasses.passes.fallback.depthwise_inputs import KeepDepthwiseInputsFloat
from qpasses.passes.fallback.keep_float_tensors import KeepFloat
from qpasses.passes.fallback.log_domain_inputs import KeepLogDomainInputsFloat
from qpasses.passes.fallback.mixed_ranges import KeepMixedRangesFloat
from qpasses.passes.fallback.non_finite_constants import KeepNonFiniteFloat
from qpasses.passes.fallback.non_mac_activations import KeepNonMacActivationsFloat
from qpasses.passes.fallback.normalization_inputs import KeepNormalizationInputsFloat
from qpasses.passes.fallback.output_heads import KeepOutputHeadsFloat
from qpasses.passes.fallback.softmax_inputs import KeepSoftmaxInputsFloat
from qpasses.passes.quantize.adaround import AdaRound
from qpasses.passes.quantize.adascale import AdaScale
from qpasses.passes.quantize.annotate_precision import AnnotatePrecision
from qpasses.passes.quantize.apply_overrides import ApplyOverrides
from qpasses.passes.quantize.calibrate import Calibrate
from qpasses.passes.quantize.check_target import CheckTarget
from qpasses.passes.quantize.encode_weights import EncodeWeights
from qpasses.passes.quantize.insert_converts import InsertConverts
from qpasses.passes.quantize.int32_overrides import Int32Overrides
from qpasses.passes.quantize.portable_storage import PortableStorage
from qpasses.passes.quantize.qdq_lowering import QDQLowering
from qpasses.passes.quantize.runtime_parity_check import RuntimeParityCheck
from qpasses.passes.quantize.seq_mse import SeqMSE
from qpasses.targets import BUILTIN_TARGETS

BUILTIN_PASSES = (
    # graph cleanup and interop
    DeadCodeElimination,
    IdentityElimination,
    InferShapes,
    InlineFunctions,
    RewriteScript,
    SinkTransposes,
    UpgradeOpset,
    # FP32-preserving rewrites
    FoldChannelAffine,
    FoldBatchNorm,
    CrossLayerEqualization,
    FoldMatMulBias,
    # quantization: annotate, encode, calibrate, lower
    ApplyOverrides,
    KeepNonFiniteFloat,
    KeepLogDomainInputsFloat,
    KeepDataIndependentFloat,
    KeepDecomposedBlocksFloat,
    KeepNormalizationInputsFloat,
    KeepSoftmaxInputsFloat,
    KeepMixedRangesFloat,
    KeepDepthwiseInputsFloat,
    KeepOutputHeadsFloat,
    KeepNonMacActivationsFloat,
    KeepFloat,
    AnnotatePrecision,
    CheckTarget,
    Int32Overrides,
    SeqMSE,
    AdaRound,
    AdaScale,
    EncodeWeights,
    Calibrate,
    BiasCorrection,
    QDQLowering,
    InsertConverts,
    PortableStorage,
    # checks
    RuntimeParityCheck,
)


def default_registry() -> Registry:
    """Built-in passes and targets plus whatever installed packages register."""
    reg = Registry()
    for cls in BUILTIN_PASSES:
        reg.add_pass(cls)
    for t in BUILTIN_TARGETS:
        reg.add_target(t)
    for cls in load_entry_points("qpasses.passes"):
        reg.add_pass(cls)
    for t in load_entry_points("qpasses.targets"):
        reg.add_target(t)
    return reg


__all__ = ["BUILTIN_PASSES", "default_registry"]
