"""Events, evaluation and pure functions over event logs."""
