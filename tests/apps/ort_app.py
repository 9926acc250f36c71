"""An app written against onnxruntime only: the drop-in test runs it with hermes_ort in onnxruntime's place."""
import numpy as np
import onnxruntime as ort


def infer(model_path: str, rows: int = 2) -> np.ndarray:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    feed = {first.name: np.random.default_rng(0).standard_normal((rows, first.shape[-1])).astype(np.float32)}
    output_name = session.get_outputs()[0].name
    return session.run([output_name], feed)[0]
