"""``python -m services.teacher --model PATH_OR_NAME --port 50051``: serve one teacher over gRPC."""

from services.teacher.server import main

main()
