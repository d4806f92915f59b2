"""The learner: the objective of seed 000 (``learner.objective``), the dense-term divergences
(``learner.divergences``) and the training process. Submodules import torch; this package
itself imports nothing heavy.
"""
