"""The quality study (``tokenfilter study``): which Token Filtering configuration holds up, chosen on one half
of the data and reported on the other half and on a second real model, against the random floor and layer
removal at matched FLOPs."""

from tokenfilter.study.runner import StudyConfig, run_study

__all__ = ["StudyConfig", "run_study"]
