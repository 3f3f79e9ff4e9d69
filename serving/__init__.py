"""Troupe's Ray Serve application: gateway + sticky canary router + model backends.

``serving.app:build_app`` is the import path used by ``troupe deploy`` and the Helm RayService chart;
``serving.gateway`` holds the pure request/routing rules; ``serving.backend`` the model backends.
"""
