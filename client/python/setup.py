"""Build script of the negmine Python package.

The gRPC stubs are generated from proto/negmine/v1/negmine.proto at build
time (protoc and grpc_python_plugin from Debian's protobuf-compiler and
protobuf-compiler-grpc; no grpc_tools) into the build output, next to the
package's sources; they are never committed.

Install from a checkout (what `make python` does):
    /usr/bin/python3 -m venv --system-site-packages venv
    venv/bin/pip install --no-deps --no-build-isolation client/python

Environment:
  NEGMINE_PROTO_DIR    the folder holding negmine/v1/negmine.proto
                       (default: the checkout's proto/)
  NEGMINE_PROTOC       protoc (default: protoc on PATH, else /usr/bin/protoc)
  NEGMINE_GRPC_PYTHON_PLUGIN  grpc_python_plugin (default: on PATH, else
                       /usr/bin/grpc_python_plugin)
  NEGMINE_BUILD_DIR    where setuptools' build/ and egg-info go (default:
                       setuptools' own, inside client/python)

`python3 setup.py gen_stubs` writes the stubs into the source tree instead
(git-ignored), for running from a checkout with PYTHONPATH=client/python.
"""
import os
import shutil
import subprocess

from setuptools import Command, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_REL = os.path.join("negmine", "v1", "negmine.proto")


def _tool(env: str, name: str) -> str:
    path = os.environ.get(env) or shutil.which(name) or os.path.join("/usr/bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} not found (set {env}); on Debian: "
                           "apt-get install protobuf-compiler protobuf-compiler-grpc")
    return path


def generate_stubs(out_dir: str) -> None:
    """Writes negmine/v1/negmine_pb2.py and negmine_pb2_grpc.py under out_dir."""
    proto_dir = os.environ.get("NEGMINE_PROTO_DIR") or os.path.join(HERE, "..", "..", "proto")
    proto_dir = os.path.abspath(proto_dir)
    proto = os.path.join(proto_dir, PROTO_REL)
    if not os.path.exists(proto):
        raise RuntimeError(f"{proto} not found: build from a negmine checkout or set "
                           "NEGMINE_PROTO_DIR")
    os.makedirs(os.path.join(out_dir, "negmine", "v1"), exist_ok=True)
    cmd = [_tool("NEGMINE_PROTOC", "protoc"), f"--proto_path={proto_dir}",
           f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
           "--plugin=protoc-gen-grpc_python="
           + _tool("NEGMINE_GRPC_PYTHON_PLUGIN", "grpc_python_plugin"), proto]
    subprocess.run(cmd, check=True)


class BuildPyWithStubs(build_py):
    """build_py that also generates the gRPC stubs into the build output."""

    def run(self) -> None:
        super().run()
        if not self.dry_run:
            generate_stubs(self.build_lib)

    def get_outputs(self, include_bytecode: bool = True):  # noqa: D102
        outputs = super().get_outputs(include_bytecode)
        for name in ("negmine_pb2.py", "negmine_pb2_grpc.py"):
            outputs.append(os.path.join(self.build_lib, "negmine", "v1", name))
        return outputs


class GenStubs(Command):
    """Writes the stubs into the source tree (git-ignored)."""

    description = "generate negmine/v1/negmine_pb2*.py in the source tree"
    user_options = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate_stubs(HERE)


options = {}
if os.environ.get("NEGMINE_BUILD_DIR"):
    base = os.environ["NEGMINE_BUILD_DIR"]
    options = {"build": {"build_base": os.path.join(base, "build")},
               "egg_info": {"egg_base": base}}
    os.makedirs(base, exist_ok=True)

setup(
    name="negmine",
    version="0.1.0",
    description="Python client of negmine, the hard-negative mining service",
    packages=["negmine", "negmine.v1"],
    python_requires=">=3.9",
    # Provided by Debian (python3-grpcio, python3-protobuf, python3-numpy);
    # installed with --no-deps. torch is optional.
    install_requires=["grpcio", "protobuf", "numpy"],
    extras_require={"torch": ["torch"]},
    cmdclass={"build_py": BuildPyWithStubs, "gen_stubs": GenStubs},
    options=options,
    zip_safe=False,
)
