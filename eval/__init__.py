"""Quality evaluation of steered decoding (`python -m eval --help`, see README.md).

One package per task family (`truthfulqa`, `mc_tasks`) on a shared core (`core`: scoring,
steering placement, the baseline/ITI/FASB evaluation, runtime, judge, bootstrap, reports); `cli`
registers each family's subcommand.
"""
