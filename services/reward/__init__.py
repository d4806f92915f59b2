"""Reward service: named verifiers (built-in, user Python, remote) behind ``distill.v1.RewardService``.

Run ``python -m services.reward --port 50061``; the rollout worker talks to it through
``services.reward.client.RewardClient``.
"""
