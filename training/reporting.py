"""What a run reports besides its record log: the machine and software it ran on, and an optional
mirror of its metrics in Weights & Biases."""
import os
import platform
import subprocess
import sys

import torch

from training.record_log import format_cpu_hardware_line, format_gpu_fallback_hardware_line


def hardware_description(device):
    if device.type == "cuda":
        try:
            return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return format_gpu_fallback_hardware_line(torch.cuda.device_count(), torch.cuda.get_device_name(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return format_cpu_hardware_line(model, os.cpu_count())


def software_versions():
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}"


class WandbRun:
    """Optional mirror of the run in Weights & Biases: a failure there is one warning, never a failed run."""

    def __init__(self, project, config):
        self.run = None
        if not project:
            return
        try:
            import wandb

            self.run = wandb.init(project=project, config=config)
        except Exception as e:  # noqa: BLE001 - missing package, no login, network: all just disable wandb
            self._disable(e)

    def _disable(self, error):
        print(f"warning: wandb disabled, the run goes on without it ({type(error).__name__}: {error})",
              file=sys.stderr)
        self.run = None

    def log(self, metrics, step):
        if self.run:
            try:
                self.run.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001
                self._disable(e)

    def finish(self, log_path, status):
        if self.run:
            try:
                self.run.summary["status"] = status
                if log_path:
                    self.run.save(log_path, base_path=os.path.dirname(os.path.abspath(log_path)), policy="now")
                self.run.finish(exit_code=0 if status == "completed" else 1)
            except Exception as e:  # noqa: BLE001
                self._disable(e)
