"""Reading finished runs: answer statistics, the comparison table, loss curves."""
