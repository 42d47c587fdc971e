"""soup_export: compile a customer's domain mix into a quantized ONNX specialist."""
