"""The demo: the `digits` preset and a `digits_cnn` trained for each framework.

Idempotent: anything already in storage is kept. Training runs in the backend of each
framework (torch / tensorflow are imported only when a model must be trained).
"""
from __future__ import annotations

from pathlib import Path

from optimization.backends import LAYOUTS, get_backend
from optimization.base import FRAMEWORKS
from optimization.datasets import load_digits_preset, write_digits_preset

DEMO_MODEL = "digits_cnn"
DEMO_DATASET = "digits"


def demo_model_path(storage_root: Path, framework: str) -> Path:
    suffix = {"pytorch": ".pt2", "tensorflow": ".keras"}[framework]
    return Path(storage_root) / "models" / "pretrained" / framework / f"{DEMO_MODEL}{suffix}"


def seed_demo(storage_root: Path, frameworks=FRAMEWORKS, log=print) -> list[Path]:
    """Write what is missing; return the paths written."""
    from optimization.worker import prepare_worker_process

    prepare_worker_process()  # training may load either framework
    written = []
    preset_dir = Path(storage_root) / "dataset" / "preset" / DEMO_DATASET
    if not (preset_dir / "digits.npz").exists():
        written.append(write_digits_preset(preset_dir))
        log(f"wrote the {DEMO_DATASET} preset to {preset_dir}")
    for framework in frameworks:
        path = demo_model_path(storage_root, framework)
        if path.exists():
            log(f"{framework} {DEMO_MODEL} already at {path}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset = load_digits_preset(preset_dir, LAYOUTS[framework])
        written.append(get_backend(framework).train_demo_model(dataset, path))
        log(f"trained {framework} {DEMO_MODEL} and saved it to {path}")
    return written
