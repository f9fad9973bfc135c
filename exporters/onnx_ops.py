"""ONNX schemas for this project's custom nodes, registered on first use.

- `mythos_deploy::MoEExperts` (v1): the placeholder the torch exporter emits for the
  `mythos_deploy::moe_experts` custom op. Never left in a finished artifact: a lowering pass
  (exporters/moe_lowering.py) rewrites it to one of the three lowerings.
- `trt.plugins::MythosMoE` (v1): the TensorRT plugin node of the `plugin` lowering. TensorRT's
  ONNX parser maps an unknown op_type to the plugin of that name found in the plugin registry,
  reading `plugin_namespace` / `plugin_version` attributes. The name is the project's own,
  distinct from TensorRT built-ins such as `TRT_MoE`.
- `trt::TRT_INT4DequantizeLinear` (v1): blocked int4 weight dequantization for TensorRT
  parsers of opset <= 20 (exporters/qdq.py), the opset-21 DequantizeLinear's meaning:
  y = x * scale, one scale per `block_size` elements along `axis`. Registered so the checker
  and shape inference know its output (the scale's type, the data's shape).
"""

from __future__ import annotations

from mythos_deploy.contract import PLACEHOLDER_DOMAIN, PLACEHOLDER_OP, PLUGIN_DOMAIN, PLUGIN_OP


_registered = False


def _moe_schema(name: str, domain: str, doc: str):
    from onnx import defs
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.Attribute
    S, I = defs.OpSchema.AttrType.STRING, defs.OpSchema.AttrType.INT
    attrs = [A("num_experts", I, "E"), A("top_k", I, "K"), A("expert_dim", I, "F")]
    if domain == PLUGIN_DOMAIN:
        attrs += [A("plugin_namespace", S, "plugin namespace"), A("plugin_version", S, "plugin version")]
    return defs.OpSchema(
        name, domain, 1, doc,
        inputs=[P("x", "T", "[N, D] tokens"), P("topk_idx", "tensor(int64)", "[N, K] chosen experts"),
                P("gates", "T", "[N, K] renormalised gates"), P("w_gate", "T", "[E, F, D]"),
                P("w_up", "T", "[E, F, D]"), P("w_down", "T", "[E, D, F]")],
        outputs=[P("y", "T", "[N, D] gate-weighted sum of the chosen SwiGLU experts")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
        attributes=attrs)


def _int4_dq_schema():
    from onnx import defs
    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    schema = defs.OpSchema(
        "TRT_INT4DequantizeLinear", "trt", 1, "blocked int4 DequantizeLinear (TensorRT custom importer)",
        inputs=[P("x", "tensor(int4)", "quantized weight"), P("scale", "T", "one scale per block")],
        outputs=[P("y", "T", "dequantized weight")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
        attributes=[A("axis", defs.OpSchema.AttrType.INT, "blocked axis"),
                    A("block_size", defs.OpSchema.AttrType.INT, "elements per scale")])

    def infer(ctx):
        from onnx import TypeProto
        x, scale = ctx.get_input_type(0), ctx.get_input_type(1)
        out = TypeProto()
        out.tensor_type.elem_type = scale.tensor_type.elem_type
        if x.tensor_type.HasField("shape"):
            out.tensor_type.shape.CopyFrom(x.tensor_type.shape)
        ctx.set_output_type(0, out)
    schema.set_type_and_shape_inference_function(infer)
    return schema


def register_schemas() -> None:
    """Idempotent: make onnx.checker and shape inference know the project's custom nodes."""
    global _registered
    if _registered:
        return
    from onnx import defs
    for name, domain, doc in ((PLACEHOLDER_OP, PLACEHOLDER_DOMAIN, "export placeholder for the routed-expert op"),
                              (PLUGIN_OP, PLUGIN_DOMAIN, "mythos-deploy MoE TensorRT plugin")):
        try:
            defs.get_schema(name, 1, domain)
        except defs.SchemaError:
            defs.register_schema(_moe_schema(name, domain, doc))
    try:
        defs.get_schema("TRT_INT4DequantizeLinear", 1, "trt")
    except defs.SchemaError:
        defs.register_schema(_int4_dq_schema())
    _registered = True
