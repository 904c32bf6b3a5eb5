"""What two or more pass families use: scoring (metric, evaluators, drop), timing, surgery, and
quantize's capture of every float activation (over the core :mod:`onnxopt.activations`, which
the pipeline's verification shares; sessions: :func:`onnxopt.evaluation.session_for`).

Modules here import nothing from a pass family, so any family may import them.
"""
