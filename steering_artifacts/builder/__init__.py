"""The artifact builder: datasets, activation collection, probes, directions, manifests, reports.

`python -m steering_artifacts build|report ...` runs `steering_artifacts.builder.cli`.
"""
