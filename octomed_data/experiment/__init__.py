"""The recipe lab: the paper's data-recipe ablations as one study over one body of distilled data.

An :class:`~octomed_data.experiment.spec.ExperimentSpec` names a base run (distilled and filtered
once) and arms. Each arm selects from the base run's accepted traces (:mod:`.select`: source
groups by image presence, k samples per question, a pass-rate band, teachers) with no teacher request, and
may override training and evaluation; :mod:`.compare` turns the arms' evaluation predictions into
the comparison report (paired-bootstrap intervals, per-group averages). ``flows/experiment.py`` runs the
arms (mixture, export, train once per data and training settings, evaluate).
"""

from octomed_data.experiment.spec import Arm, ExperimentSpec, load_spec

__all__ = ["Arm", "ExperimentSpec", "load_spec"]
