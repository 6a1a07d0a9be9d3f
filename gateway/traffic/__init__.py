"""Versions and traffic: a split of a model's requests between its versions, and shadow copies."""
