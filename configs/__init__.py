"""Job configs: each file's get_config() returns an ml_collections ConfigDict (see configs/base.py)."""
