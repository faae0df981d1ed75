"""Build steering artifacts (per-head probes + steering directions) for fasb-server.

`python -m steering_artifacts build --help`; the prebuilt artifacts live in this folder, one
`<model-slug>/<behaviour>/` folder each (see README.md).
"""
