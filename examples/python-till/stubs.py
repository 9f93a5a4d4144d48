"""Generates the Python gRPC stubs from the repository's proto/ into a scratch directory.

Nothing generated is committed: the protos are the contract, so the stubs are made from them
on every run and can never drift from the server. Call `load()` once, then import
`loyalty.v1.checkout_pb2`, `..._pb2_grpc` and so on.
"""

import atexit
import glob
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.environ.get("LOYALTY_PROTO_DIR", os.path.join(HERE, "..", "..", "proto"))


def load():
    from grpc_tools import protoc  # grpcio-tools ships protoc and the well-known types
    import grpc_tools

    out = tempfile.mkdtemp(prefix="loyalty-stubs-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    protos = sorted(glob.glob(os.path.join(PROTO_DIR, "loyalty", "v1", "*.proto")))
    if not protos:
        raise SystemExit(f"no protos under {PROTO_DIR}")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}",
            f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("generating the stubs from proto/ failed")
    sys.path.insert(0, out)
