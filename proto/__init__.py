"""Wire contracts: the versioned .proto files and the Python code generated from them.

Regenerate after editing a .proto file with ``python -m proto.generate``; never edit the
generated ``*_pb2*.py`` files by hand (a test fails when they are stale).
"""
