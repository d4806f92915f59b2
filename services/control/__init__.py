"""Control plane: the REST API (FastAPI) over the run state in Redis, and the ``distill`` CLI.

``app`` builds the app, ``routers/`` hold one resource each, ``store``/``registry`` talk to Redis
under the contract of ``contracts/runstate.py``, ``problems`` maps errors to RFC 9457 bodies,
``cli`` is the ``distill`` command. Never imports torch.
"""
