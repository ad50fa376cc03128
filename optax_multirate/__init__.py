"""optax-multirate: different parts of a network on different time scales, in Optax."""

from optax_multirate import labels, models, phases
from optax_multirate.labels import (
    check_labels,
    depth_labels,
    random_labels,
    rule_labels,
    weight_bias_labels,
)
from optax_multirate.phases import (
    FreezeScheduleState,
    PhasedStep,
    PhaseTag,
    StepOutput,
    find_tags,
    freeze_schedule,
    needed_mask,
    needed_tree,
    phase_tag,
    read_phases,
    set_phase,
)

__version__ = "0.1.0"

__all__ = [
    "labels",
    "models",
    "phases",
    "check_labels",
    "depth_labels",
    "random_labels",
    "rule_labels",
    "weight_bias_labels",
    "FreezeScheduleState",
    "PhasedStep",
    "PhaseTag",
    "StepOutput",
    "find_tags",
    "freeze_schedule",
    "needed_mask",
    "needed_tree",
    "phase_tag",
    "read_phases",
    "set_phase",
]
