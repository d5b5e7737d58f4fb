"""The local icomm SMS API sandbox: a fast stand-in with fault injection for dev, tests and benchmarks."""

from worker.devtools.sandbox.config import SandboxConfig, add_arguments, config_from_args
from worker.devtools.sandbox.process import SandboxProcess
from worker.devtools.sandbox.server import build_app, run

__all__ = ["SandboxConfig", "SandboxProcess", "add_arguments", "build_app", "config_from_args", "run"]
