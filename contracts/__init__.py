"""Small pure-Python contracts shared by processes (no torch, no numpy).

`contracts.schedules` holds the λ schedules that the control plane validates and the learner
evaluates.
"""
