"""Steering artifacts (per-head probes + steering directions) for fasb-server.

The prebuilt artifacts ship in this folder, one `<model-slug>/<behaviour>/` folder each; the code
that builds them is `steering_artifacts.builder` (`python -m steering_artifacts build --help`,
see README.md). The server reads the artifact folders only and never imports the builder.
"""
