"""TruthfulQA: MC1/MC2/MC3 scoring, judged generation (single split or pooled folds), the sweeps
that choose an artifact's recommended values, and the monitor's false-alarm check."""
