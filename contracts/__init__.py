"""Contracts shared by the platform's processes; nothing here imports torch.

- ``runspec``: the run spec users submit (pydantic); ``schedules``: λ schedules (pure Python).
- ``runstate``: run lifecycle, registries and metrics in Redis; ``keys``: every Redis key name.
- ``rollout_record`` and ``tensors``: the rollout record and packed little-endian arrays (numpy).
- ``redis_server``: Redis clients with retries, and the embedded ``redis-server``.
- ``die_with_parent``: runs a child process that gets SIGTERM when its parent dies.
"""
