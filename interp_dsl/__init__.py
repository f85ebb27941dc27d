"""interp_dsl: a compiler for neural-network interventions.

    from interp_dsl import LanguageModel
    model = LanguageModel("smollm2-135m")
    with model.trace("The Eiffel Tower is in the city of"):
        logits = model.lm_head.output.save()
"""

from collections.abc import Callable
from typing import Any

from compiler.errors import CheckError as CheckError
from compiler.errors import ExecutionError as ExecutionError
from compiler.errors import InterventionError as InterventionError
from compiler.errors import ProxyControlFlowError as ProxyControlFlowError
from compiler.errors import UnknownModuleError as UnknownModuleError
from compiler.errors import UnsupportedOperationError as UnsupportedOperationError
from compiler.errors import ValueUnavailableError as ValueUnavailableError
from interp_dsl import einops_backend as _einops_backend  # noqa: F401  (registers proxies with einops)
from interp_dsl.client import Remote as Remote
from interp_dsl.client import RemoteError as RemoteError
from interp_dsl.client import remote as remote
from interp_dsl.cluster import RayCluster as RayCluster
from interp_dsl.cluster import ray_cluster as ray_cluster
from interp_dsl.models import CompileFallbackWarning as CompileFallbackWarning
from interp_dsl.models import LanguageModel as LanguageModel
from interp_dsl.models import Model as Model
from interp_dsl.models import NNsight as NNsight
from interp_dsl.proxy import Proxy as Proxy
from interp_dsl.saved_list import SavedList as SavedList
from interp_dsl.spans import user_span
from interp_dsl.sweeps import Sweep as Sweep
from interp_dsl.tracing import Tracer as Tracer
from runtime.datasets import PromptFile as PromptFile
from runtime.shards import Results as Results
from runtime.shards import load_results as load_results


def save(value: Proxy) -> Proxy:
    """Keep `value` after the trace (the function spelling of `value.save()`)."""
    return value.save()


def list(*items: object) -> SavedList:  # noqa: A001  (nnsight's name: `nnsight.list().save()`)
    """A list to append values to inside a trace; afterwards it holds them (one per step for a
    value made in a generation step block)."""
    return SavedList(items)


def apply(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """nnsight's `apply(fn, *args)`: `fn` called on traced values, its operations recorded into the
    trace like any others (the IR holds the operations, never the function). Its body may use
    what a trace may: the vocabulary's functions, methods and operators (docs/vocabulary.md); a
    step outside it is an error at that line of `fn`."""
    if not callable(fn):
        raise InterventionError.at(user_span(), f"apply takes a function, not a {type(fn).__name__}",
                                   "apply(torch.sum, model.layer1.output)")
    return fn(*args, **kwargs)
