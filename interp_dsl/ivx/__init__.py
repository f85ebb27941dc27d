"""`.ivx` experiments, one module per stage: `declare` (parse and resolve declarations), `lower`
(record the IR through the proxy API's tracer), `run` (one run per sweep point, a sweep over the
prompts, or a session's traces), `check` (`ivx check`: every file on a config-only model, no weights), `show` (`ivx show`
and `ivx plot` of a results directory)."""

from interp_dsl.ivx.declare import MAX_SWEEP_POINTS as MAX_SWEEP_POINTS
from interp_dsl.ivx.declare import Experiment as Experiment
from interp_dsl.ivx.declare import ExperimentError as ExperimentError
from interp_dsl.ivx.declare import experiment_from_text as experiment_from_text
from interp_dsl.ivx.declare import load_experiment as load_experiment
from interp_dsl.ivx.declare import read_tensor as read_tensor
from interp_dsl.ivx.lower import Lowering as Lowering
from interp_dsl.ivx.lower import lower as lower
from interp_dsl.ivx.lower import lower_traces as lower_traces
from interp_dsl.ivx.lower import session_blocks as session_blocks
from interp_dsl.ivx.run import RunOutput as RunOutput
from interp_dsl.ivx.run import resolve_model as resolve_model
from interp_dsl.ivx.run import run as run
from interp_dsl.ivx.run import run_session as run_session
from interp_dsl.ivx.run import sweep as sweep
