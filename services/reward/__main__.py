"""Entry point: ``python -m services.reward --port 50061`` (see ``--help``)."""

from services.reward.app import main

if __name__ == "__main__":
    main()
