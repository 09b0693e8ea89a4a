"""Loads the plugin with the ``ranks`` fixture for test_train_minimal.py (see docs/testing.md)."""

pytest_plugins = ["local_sgd_optim.testing"]
