"""TensorRT 10.1 ONNX-parser operator support, as data.

Source: onnx/onnx-tensorrt, docs/operators.md at the "ONNX-TensorRT 10.1 GA release" commit
(96e7811): TensorRT 10.0/10.1 parse default-domain opsets 9 to 20. Keys are op types; values
the element types the parser accepts for them (f32 f16 bf16 i32 i64 b u8 i8 i4 f8). Restrictions
that matter to these graphs are checked in code (exporters/trt_lint.py)."""

TRT_VERSION = "10.1"
OPSET_RANGE = (9, 20)

_GROUPS = {
    "b": """And Not Or Xor""",
    "b bf16 f16 f32 i32 i64": """Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If Loop OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze Where""",
    "b bf16 f16 f32 i32 i64 u8": """Cast CastLike""",
    "bf16 f16 f32": """Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor GRU Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool GroupNormalization HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf LRN LSTM LayerNormalization LeakyRelu Log LogSoftmax LpNormalization LpPool MatMul MaxPool MeanVarianceNormalization PRelu ParametricSoftplus Pow QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike Reciprocal Resize Round ScaledTanh Scan Selu Sigmoid Sin Sinh Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample""",
    "bf16 f16 f32 f8 i32 i64": """Mean""",
    "bf16 f16 f32 i32 i64": """Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min Mod Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth Sub Sum TopK""",
    "bf16 f16 f32 i32 i64 i8": """Gelu""",
    "f16 f32": """DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign""",
    "f8 i4 i8": """DequantizeLinear""",
}

SUPPORTED: dict[str, frozenset[str]] = {
    op: frozenset(types.split()) for types, ops in _GROUPS.items() for op in ops.split()
}

UNSUPPORTED = frozenset("""AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Col2Im CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow HannWindow ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique""".split())
