"""What every task family's evaluation shares: answer scoring with the monitor and steering
(`scoring`, `steering`, `evaluation`), the model / Engine in process (`runtime`), the generation
judge, bootstrap intervals, result tables and JSON, and manifest recommendations."""
