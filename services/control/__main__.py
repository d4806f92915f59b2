"""``python -m services.control --dev --port 8000``: serve the control plane with uvicorn."""

from services.control.serve import main

main()
