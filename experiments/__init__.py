"""Experiment modules: ``python -m experiments.NAME [flags]`` (see ``--help``)."""
