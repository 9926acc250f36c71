"""Making stages from ONNX graphs: cutting any model, merging stages back into one graph."""
