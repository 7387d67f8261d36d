"""Build hook: generate the gRPC stubs into the built package (they are never committed)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _proto_build():
    spec = importlib.util.spec_from_file_location("proto_build", ROOT / "proto" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        proto_build = _proto_build()
        if self.editable_mode:
            if proto_build.stale():
                proto_build.generate()
        else:
            proto_build.generate(Path(self.build_lib) / "proto")


setup(cmdclass={"build_py": BuildWithStubs})
