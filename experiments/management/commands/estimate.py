"""`manage.py estimate MODEL_FILE --device rpi4 [--runtime ...] [--precision ...] [--threads 4] [--json]`:
the PerformanceEstimator alone on a .tflite, .onnx, .keras or .pt2 file."""
from __future__ import annotations

import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from optimization.estimator import PRECISIONS, RUNTIMES, UnknownDeviceError, estimate, load_profiles

SUFFIXES = (".tflite", ".onnx", ".keras", ".h5", ".pt2", ".pt", ".zip")


class Command(BaseCommand):
    help = "Estimate latency, peak memory and energy of a model file on an edge device (estimated, not measured)."

    def add_arguments(self, parser):
        parser.add_argument("model_file", help="a .tflite, .onnx, .keras or .pt2 model")
        parser.add_argument("--device", required=True, help="a device profile, e.g. rpi4 or rpi5")
        parser.add_argument("--runtime", choices=RUNTIMES, help="default: the file's own (tflite for .tflite)")
        parser.add_argument("--precision", choices=PRECISIONS, help="default: what the file contains")
        parser.add_argument("--threads", type=int, default=4)
        parser.add_argument("--json", action="store_true", help="print the estimate as JSON")

    def handle(self, *args, **options):
        path = Path(options["model_file"])
        if not path.is_file():
            raise CommandError(f"model file not found: {path}")
        if path.suffix.lower() not in SUFFIXES:
            raise CommandError(f"{path.name}: expected one of {', '.join(SUFFIXES)}")
        devices = load_profiles()["devices"]
        if options["device"] not in devices:
            raise CommandError(f"unknown device {options['device']!r}; known devices: {', '.join(sorted(devices))}")
        if options["threads"] < 1:
            raise CommandError("--threads must be at least 1")
        if path.suffix.lower() not in (".onnx", ".tflite"):  # a framework file is exported first
            from optimization.worker import prepare_worker_process

            prepare_worker_process()
        try:
            result = estimate(path, options["device"], runtime=options["runtime"],
                              precision=options["precision"], threads=options["threads"])
        except (UnknownDeviceError, ValueError, FileNotFoundError) as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps(result, indent=2))
            return
        profile = devices[result["device"]]
        self.stdout.write(
            f"{path.name} on {profile['name']} ({result['runtime']}, {result['precision']}, "
            f"{result['threads']} threads) - estimated\n"
            f"  latency  {result['latency_ms']:.2f} ms  (range {result['latency_low_ms']:.2f} - "
            f"{result['latency_high_ms']:.2f} ms)\n"
            f"  memory   {result['memory_mb']:.2f} MB peak  (up to {result['memory_high_mb']:.2f} MB)\n"
            f"  energy   {result['energy_mj']:.2f} mJ per inference  (range {result['energy_low_mj']:.2f} - "
            f"{result['energy_high_mj']:.2f} mJ)\n"
            f"  model    {result['params']:,} parameters, {result['macs']:,} MACs\n"
            "  assumptions:\n" + "\n".join(f"    - {line}" for line in result["assumptions"]))
