"""Gated rollouts of model versions: load everywhere, shift traffic in checked steps, promote or roll back."""
