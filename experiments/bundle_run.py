"""Run and time the optimized model of this bundle on the board (or any machine).

    python run.py                      # latency, and top-1 on test_split.npz when the bundle has it
    python run.py --threads 4          # as many threads as the board has cores
    python run.py --data my_test.npz   # top-1 on your own test split (x_test, y_test or x, y)

Needs numpy and the deploy runtime only: onnxruntime for a .onnx model; for a .tflite model
ai-edge-litert (`pip install ai-edge-litert`), or tflite-runtime, or full TensorFlow.
The input must already be preprocessed as preprocessing.json says (shape, layout, scaling).
EdgeOpt copies this file into every bundle unchanged.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BATCH = 256


def find_model() -> Path:
    found = sorted(HERE.glob("model.onnx")) + sorted(HERE.glob("model.tflite"))
    if not found:
        sys.exit("no model.onnx or model.tflite next to run.py")
    return found[0]


class OnnxModel:
    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        batch = self.input.shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.runtime = f"onnxruntime {ort.__version__}"

    def predict(self, x: np.ndarray) -> np.ndarray:
        step = self.fixed_batch or BATCH
        outputs = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            feed = chunk
            if self.fixed_batch and len(chunk) < step:  # a fixed-batch export: pad the last chunk
                feed = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outputs.append(self.session.run(None, {self.input.name: feed})[0][:len(chunk)])
        return np.concatenate(outputs)

    def timer(self, sample: np.ndarray):
        feed = {self.input.name: sample}
        return lambda: self.session.run(None, feed)


def litert_interpreter_class():
    """LiteRT first, then the older standalone runtime, then full TensorFlow."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime"
    except ImportError:
        pass
    try:
        import tensorflow as tf

        return tf.lite.Interpreter, f"tensorflow {tf.__version__}"
    except ImportError:
        sys.exit("a .tflite model needs LiteRT: pip install ai-edge-litert (or tflite-runtime)")


class TFLiteModel:
    def __init__(self, path: Path, threads: int):
        self.path, self.threads = path, threads
        self.interpreter_class, self.runtime = litert_interpreter_class()

    def _interpreter(self, batch: int):
        interpreter = self.interpreter_class(model_path=str(self.path), num_threads=self.threads)
        detail = interpreter.get_input_details()[0]
        if int(detail["shape"][0]) != batch:
            interpreter.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
        interpreter.allocate_tensors()
        return interpreter

    @staticmethod
    def _set_input(interpreter, x: np.ndarray) -> None:
        detail = interpreter.get_input_details()[0]
        scale, zero_point = detail["quantization"]
        if detail["dtype"] in (np.int8, np.uint8) and scale:  # an integer-input model
            info = np.iinfo(detail["dtype"])
            x = np.clip(np.round(x / scale + zero_point), info.min, info.max)
        interpreter.set_tensor(detail["index"], x.astype(detail["dtype"]))

    @staticmethod
    def _output(interpreter) -> np.ndarray:
        detail = interpreter.get_output_details()[0]
        output = interpreter.get_tensor(detail["index"])
        scale, zero_point = detail["quantization"]
        if detail["dtype"] in (np.int8, np.uint8) and scale:
            return (output.astype(np.float32) - zero_point) * scale
        return output.astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(x), BATCH):
            chunk = x[start:start + BATCH]
            interpreter = self._interpreter(len(chunk))
            self._set_input(interpreter, chunk)
            interpreter.invoke()
            outputs.append(self._output(interpreter))
        return np.concatenate(outputs)

    def timer(self, sample: np.ndarray):
        interpreter = self._interpreter(1)
        self._set_input(interpreter, sample)
        return interpreter.invoke


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        for x_key, y_key in (("x_test", "y_test"), ("x", "y")):
            if x_key in data.files and y_key in data.files:
                return data[x_key].astype(np.float32), data[y_key].astype(np.int64).reshape(-1)
    sys.exit(f"{path} needs arrays x_test and y_test (or x and y)")


def time_batch_one(invoke, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        invoke()
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        invoke()
        timings.append((time.perf_counter() - start) * 1000)
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the model next to run.py")
    parser.add_argument("--data", type=Path, default=None,
                        help="an .npz test split (x_test, y_test); default: test_split.npz if the bundle has it")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads (default 1, as EdgeOpt measured)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    parser.add_argument("--repeats", type=int, default=200, help="timed batch-1 runs (default 200)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args(argv)

    model_path = args.model or find_model()
    preprocessing = json.loads((HERE / "preprocessing.json").read_text())
    model = (OnnxModel if model_path.suffix == ".onnx" else TFLiteModel)(model_path, args.threads)
    data_path = args.data or (HERE / "test_split.npz")
    x, y = load_split(data_path) if data_path.is_file() else (None, None)

    shape = [1, *preprocessing["input_shape"]]
    sample = x[:1] if x is not None else np.zeros(shape, dtype=np.float32)
    if list(sample.shape) != shape:
        sys.exit(f"the data's samples have shape {list(sample.shape[1:])}; the model takes "
                 f"{preprocessing['input_shape']} ({preprocessing['layout']})")
    timings = time_batch_one(model.timer(sample), args.warmup, args.repeats)
    result = {
        "model": model_path.name,
        "runtime": model.runtime,
        "threads": args.threads,
        "latency_ms": statistics.median(timings),
        "latency_p10_ms": float(np.percentile(timings, 10)),
        "latency_p90_ms": float(np.percentile(timings, 90)),
        "repeats": args.repeats,
    }
    if x is not None:
        predictions = model.predict(x).argmax(axis=1)
        result.update(top1=float((predictions == y).mean()), samples=int(len(y)), data=data_path.name)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model      {result['model']} in {result['runtime']}, {args.threads} thread(s)")
    print(f"latency_ms {result['latency_ms']:.4f} median of {args.repeats} batch-1 runs "
          f"(p10 {result['latency_p10_ms']:.4f}, p90 {result['latency_p90_ms']:.4f})")
    if x is not None:
        print(f"top1       {result['top1']:.4f} on {result['samples']} samples of {result['data']}")
    else:
        print("top1       not measured: pass --data test.npz (x_test, y_test) to measure it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
