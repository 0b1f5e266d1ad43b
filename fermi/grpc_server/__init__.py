"""`fermi serve grpc`: the gRPC transport (server.py) and its stubs from proto/fermi.proto."""
