"""Generated gRPC stubs of negmine.v1 (negmine_pb2, negmine_pb2_grpc).

They are written at build time from proto/negmine/v1/negmine.proto; in a
source checkout run `/usr/bin/python3 client/python/setup.py gen_stubs`
(or install the package) first.
"""
