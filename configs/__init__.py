"""Experiment configs: each module has get_config(arg)."""
