"""Exporters (`mythos_deploy.exporters`): checkpoint -> ONNX (unroll | loop | stepped; MoE
lowerings; generic graph passes on onnx_ir), quantization (onnxruntime and TensorRT Q/DQ),
the TensorRT-compatibility lint and the TensorRT engine build. Above the runtimes: the
parity gate runs exported graphs through `mythos_deploy.runtimes`."""
