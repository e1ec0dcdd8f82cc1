"""Experiments: configs, presets, and the builders that turn a config into data and a model."""
