"""optax-multirate: different parts of a network on different time scales, in Optax.

The public API is flat: every name below is importable as ``optax_multirate.<name>``.
Submodules (``labels``, ``phases``, ``train``, ``models``, ``data``, ``parallel`` and one per
method) are public too; anything starting with ``_`` is not.
"""

from optax_multirate import labels, models, parallel, phases, train
from optax_multirate.growing import (
    GrownFitResult,
    GrowthLRAState,
    GrowthSchedule,
    GrowthStages,
    fit_grown,
    grow,
    grow_module,
    grow_variables,
    growth_lr_adaptation,
)
from optax_multirate.labels import (
    StackedDepth,
    check_labels,
    depth_labels,
    random_labels,
    rule_labels,
    weight_bias_labels,
)
from optax_multirate.lerac import (
    LeracState,
    lerac,
    lerac_depth_labels,
    lerac_schedules,
    scale_by_lerac,
)
from optax_multirate.multirate import (
    MultirateSlowState,
    MultirateState,
    MultirateSubgroupsState,
    MultirateTimescalesState,
    apply_slow_mask,
    multirate,
    multirate_sgd,
    multirate_subgroups,
    multirate_timescales,
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
    zero_unread,
)
from optax_multirate.train import (
    Callback,
    Checkpoint,
    CSVLogger,
    Evaluate,
    FitResult,
    LoopState,
    ProgressBar,
    TensorBoard,
    TrainStep,
    UpdateExtras,
    classification_loss,
    evaluate,
    fit,
    init_model,
    make_train_step,
    restore_checkpoint,
    save_checkpoint,
)
from optax_multirate.two_regimes import (
    PlateauTrigger,
    TwoRegimesPlateauState,
    TwoRegimesState,
    phase_of,
    two_regimes,
    two_regimes_sgd,
)
from optax_multirate.wus import WusState, wus, wus_labels, wus_phase

__version__ = "0.1.0"

#: Every public factory that returns an ``optax.GradientTransformation``. The common test
#: battery (tests/test_common.py) runs over exactly this list, and a test checks that it
#: names every such factory of the public API.
TRANSFORMATIONS = (
    "freeze_schedule",
    "multirate",
    "multirate_sgd",
    "multirate_subgroups",
    "multirate_timescales",
    "wus",
    "scale_by_lerac",
    "lerac",
    "two_regimes",
    "two_regimes_sgd",
    "growth_lr_adaptation",
)

__all__ = [
    # submodules
    "labels",
    "models",
    "parallel",
    "phases",
    "train",
    # labels
    "StackedDepth",
    "check_labels",
    "depth_labels",
    "random_labels",
    "rule_labels",
    "weight_bias_labels",
    # phase protocol
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
    "zero_unread",
    # train loop
    "Callback",
    "Checkpoint",
    "CSVLogger",
    "Evaluate",
    "FitResult",
    "LoopState",
    "ProgressBar",
    "TensorBoard",
    "TrainStep",
    "UpdateExtras",
    "classification_loss",
    "evaluate",
    "fit",
    "init_model",
    "make_train_step",
    "restore_checkpoint",
    "save_checkpoint",
    # multirate
    "MultirateSlowState",
    "MultirateState",
    "MultirateSubgroupsState",
    "MultirateTimescalesState",
    "apply_slow_mask",
    "multirate",
    "multirate_sgd",
    "multirate_subgroups",
    "multirate_timescales",
    # wus
    "WusState",
    "wus",
    "wus_labels",
    "wus_phase",
    # lerac
    "LeracState",
    "lerac",
    "lerac_depth_labels",
    "lerac_schedules",
    "scale_by_lerac",
    # two regimes
    "PlateauTrigger",
    "TwoRegimesPlateauState",
    "TwoRegimesState",
    "phase_of",
    "two_regimes",
    "two_regimes_sgd",
    # growing
    "GrownFitResult",
    "GrowthLRAState",
    "GrowthSchedule",
    "GrowthStages",
    "fit_grown",
    "grow",
    "grow_module",
    "grow_variables",
    "growth_lr_adaptation",
    "TRANSFORMATIONS",
]
