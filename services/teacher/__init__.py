"""Teacher scoring service: ``python -m services.teacher --model PATH --port 50051``.

``server`` translates gRPC ↔ domain, ``validation`` checks requests, ``hf_backend``/``vllm_backend``
score, ``batching`` gathers concurrent requests, ``client`` is what rollout workers use.
"""
