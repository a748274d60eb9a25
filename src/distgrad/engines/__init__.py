"""Engines start workers and move messages; they never know which algorithm runs."""
