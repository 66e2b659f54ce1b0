"""Every numeric tolerance the tests use, in one table: max absolute error unless the
name says otherwise, with the reason each is what it is. A looser entry says why."""

TOLERANCES = {
    # a rewritten graph against the unrewritten one, fp32: the fused reference ops compute
    # the same math; only the summation order differs
    "pass_fp32": 1e-5,
    # a glmc reference op against an independent formulation of the same math, fp32
    "reference_fp32": 1e-6,
    # one lowered op run by onnxruntime against its reference, fp32 (different kernels,
    # same math)
    "onnx_op_fp32": 2e-6,
    # a whole compiled fp32 artifact's logits against transformers' eager model (the same
    # bound glmc verify applies: glmc.verify.TOLERANCES[fp32])
    "artifact_fp32": 1e-4,
    # the same artifact run two ways (chunked vs one-call prefill; before/after a crash)
    "artifact_consistency_fp32": 1e-4,
    # a Triton kernel against its reference, relative to the reference's largest magnitude:
    # fp32 differs by summation order; fp16 rounds every op (~11-bit mantissa)
    "kernel_fp32_rel": 1e-4,
    "kernel_fp16_rel": 2e-2,
    # an fp16 result against an exact (float64) reference: the output's own fp16 rounding
    "fp16_output": 2e-3,
    # an fp16 GPU artifact's logits against fp32 transformers (glmc.verify.TOLERANCES[fp16])
    "artifact_fp16": 2e-2,
}
