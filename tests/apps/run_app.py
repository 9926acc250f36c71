"""python run_app.py MODEL.onnx OUT.npy [--hermes]: runs ort_app, with --hermes after
sys.modules["onnxruntime"] = hermes_ort (the one change an app makes); prints the process's peak RSS
(VmHWM: ru_maxrss would report the parent's size, as it survives execve)."""
import sys
from pathlib import Path

import numpy as np

if "--hermes" in sys.argv:
    import hermes_ort

    sys.modules["onnxruntime"] = hermes_ort
sys.path.insert(0, str(Path(__file__).parent))
import ort_app  # noqa: E402  (imported after the swap on purpose)

np.save(sys.argv[2], ort_app.infer(sys.argv[1]))
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
