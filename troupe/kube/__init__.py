"""Kubernetes front door: the training RayJob (same shape as ``charts/troupe-training``) and its submitter."""

from troupe.kube.rayjob import (
    RayJobError,
    chart_values,
    params_configmap,
    rayjob_manifest,
    submit_rayjob,
    training_values,
)

__all__ = [
    "RayJobError",
    "chart_values",
    "params_configmap",
    "rayjob_manifest",
    "submit_rayjob",
    "training_values",
]
