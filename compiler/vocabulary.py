"""The closed vocabulary: every function, tensor method and property an experiment may name.

Nothing outside this table can be recorded by the proxy API, written in `.ivx`, or loaded from an
IR payload. Each entry says which keyword arguments it accepts: `out=` is never one, and no entry
takes a callable, a device, a generator or a file. In-place tensor methods (`add_`, ...) run on a
copy; the frontends turn them into writes when they act on a module's value. `docs/vocabulary.md`
is generated from this table (`python -m compiler.vocabulary`).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import einops
import torch
import torch.nn.functional as F

ANY_NAME = "*"  # in an entry's keywords: any identifier (einops' axis lengths)


@dataclass(frozen=True)
class Entry:
    """One name of the vocabulary."""

    name: str  # "torch.softmax", "Tensor.argmax", "Tensor.T", "add", "getitem"
    func: Callable[..., Any]
    keywords: frozenset[str]
    kind: str  # "operator" | "function" | "factory" | "method" | "property" | "inplace"
    section: str  # the heading it is documented under

    def accepts(self, keyword: str) -> bool:
        return keyword in self.keywords or (ANY_NAME in self.keywords and keyword.isidentifier()
                                            and not keyword.startswith("_"))


# ------------------------------------------------------------------------------- declarations
# `name(kw1,kw2)` declares a name and the keyword arguments it takes; a bare name takes none.
_ELEMENTWISE = """
abs neg exp exp2 log log2 log10 log1p expm1 sqrt rsqrt sin cos tan tanh sigmoid relu sign sgn
floor ceil trunc frac reciprocal square erf erfc isnan isinf isfinite logical_not bitwise_not
signbit round(decimals) nan_to_num(nan,posinf,neginf) clamp(min,max) clip(min,max) pow(exponent)
add(alpha) sub(alpha) mul div(rounding_mode) true_divide floor_divide remainder fmod maximum
minimum fmax fmin eq ne lt le gt ge logical_and logical_or logical_xor bitwise_and bitwise_or
bitwise_xor atan2 hypot lerp(weight) xlogy where
"""
_LINEAR = "matmul mm bmm outer dot inner cross(dim) kron"
_REDUCTIONS = """
sum(dim,keepdim,dtype) nansum(dim,keepdim,dtype) mean(dim,keepdim,dtype) nanmean(dim,keepdim,dtype)
prod(dim,keepdim,dtype) amax(dim,keepdim) amin(dim,keepdim) aminmax(dim,keepdim) max(dim,keepdim)
min(dim,keepdim) argmax(dim,keepdim) argmin(dim,keepdim) std(dim,correction,keepdim,unbiased)
var(dim,correction,keepdim,unbiased) norm(p,dim,keepdim,dtype) logsumexp(dim,keepdim)
cumsum(dim,dtype) cumprod(dim,dtype) cummax(dim) cummin(dim) logcumsumexp(dim) all(dim,keepdim)
any(dim,keepdim) count_nonzero(dim) median(dim,keepdim) topk(k,dim,largest,sorted)
sort(dim,descending,stable) argsort(dim,descending,stable) kthvalue(k,dim,keepdim)
softmax(dim,dtype) log_softmax(dim,dtype) dist(p) allclose(rtol,atol,equal_nan)
isclose(rtol,atol,equal_nan) equal
"""
_SHAPES = """
reshape(shape) flatten(start_dim,end_dim) unflatten(dim,sizes) squeeze(dim) unsqueeze(dim)
transpose(dim0,dim1) swapaxes(axis0,axis1) permute(dims) movedim(source,destination) t
repeat_interleave(repeats,dim,output_size) tile(dims) flip(dims) roll(shifts,dims)
narrow(dim,start,length) select(dim,index) index_select(dim,index) gather(dim,index)
take_along_dim(indices,dim) scatter(dim,index,src,value,reduce) scatter_add(dim,index,src)
index_add(dim,index,source,alpha) masked_fill(mask,value) chunk(chunks,dim)
split(split_size_or_sections,dim) tensor_split(indices_or_sections,dim) unbind(dim)
diagonal(offset,dim1,dim2) diag(diagonal) tril(diagonal) triu(diagonal) trace clone detach
"""
_METHODS_ONLY = """
view view_as expand expand_as repeat reshape_as contiguous float half bfloat16 double long int
short bool to(dtype,copy) type_as
"""
_INPLACE = """
add_(alpha) sub_(alpha) mul_ div_(rounding_mode) clamp_(min,max) clip_(min,max) zero_ fill_
copy_ masked_fill_ neg_ abs_ relu_ sigmoid_ tanh_ exp_ log_ pow_ sqrt_ floor_ ceil_
round_(decimals) lerp_(weight)
"""
_PROPERTIES = "T mT H mH real imag"
_TORCH_ONLY = """
cat(dim) concat(dim) stack(dim) hstack vstack einsum tensordot(dims) cdist(p)
cosine_similarity(dim,eps) broadcast_to(size) zeros_like(dtype) ones_like(dtype) full_like(dtype)
"""
_FACTORIES = """
zeros(dtype) ones(dtype) full(dtype) arange(dtype) linspace(dtype) eye(dtype) tensor(dtype)
randn(dtype) rand(dtype) randint(dtype) randn_like(dtype) rand_like(dtype) randint_like(dtype)
"""
_FUNCTIONAL = """
softmax(dim,dtype) log_softmax(dim,dtype) softmin(dim,dtype) relu relu6
gelu(approximate) silu mish elu(alpha) selu
celu(alpha) leaky_relu(negative_slope) softplus(beta,threshold)
hardtanh(min_val,max_val) sigmoid tanh logsigmoid glu(dim) normalize(p,dim,eps)
layer_norm(normalized_shape,weight,bias,eps) rms_norm(normalized_shape,weight,eps)
linear(weight,bias) embedding(padding_idx) cosine_similarity(dim,eps)
pairwise_distance(p,eps,keepdim) pad(pad,mode,value) one_hot(num_classes)
cross_entropy(weight,ignore_index,reduction,label_smoothing) nll_loss(weight,ignore_index,reduction)
mse_loss(reduction) l1_loss(reduction) smooth_l1_loss(reduction,beta) kl_div(reduction,log_target)
binary_cross_entropy(weight,reduction) binary_cross_entropy_with_logits(weight,reduction,pos_weight)
scaled_dot_product_attention(attn_mask,dropout_p,is_causal,scale)
"""
_LINALG = """
vector_norm(ord,dim,keepdim,dtype) matrix_norm(ord,dim,keepdim,dtype) norm(ord,dim,keepdim,dtype)
svd(full_matrices) svdvals qr(mode) cholesky(upper) eigh(UPLO) eigvalsh(UPLO) det slogdet inv
pinv(hermitian,rtol,atol) solve(left) lstsq(rcond) matrix_rank(hermitian) matmul vecdot(dim)
cross(dim) diagonal(offset,dim1,dim2)
"""
_SPECIAL = "logit(eps) expit erf erfc erfinv entr log_softmax(dim,dtype) softmax(dim,dtype) xlogy logsumexp(dim,keepdim)"
_FFT = "fft(n,dim,norm) ifft(n,dim,norm) rfft(n,dim,norm) irfft(n,dim,norm) fftn(s,dim,norm) ifftn(s,dim,norm) rfftn(s,dim,norm)"
_EINOPS = f"rearrange({ANY_NAME}) reduce({ANY_NAME}) repeat({ANY_NAME}) einsum"
_OPERATOR_NAMES = """
add sub mul truediv floordiv mod pow matmul neg pos abs invert and_ or_ xor lshift rshift lt le gt
ge eq ne getitem
"""

# Functions of torch.nn.functional with an `inplace=` flag: the frontends record the pure call, and
# `inplace=True` on a module's value as a write.
INPLACE_FLAG = frozenset(f"torch.nn.functional.{n}" for n in (
    "relu", "relu6", "silu", "mish", "elu", "selu", "celu", "leaky_relu", "hardtanh"))
EINOPS_REDUCTIONS = ("min", "max", "sum", "mean", "prod", "any", "all")
DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128")}
_MAX_SHIFT = 62
INT_BOUND = 2**63  # integers outside int64 are refused: torch cannot hold them, and they grow without bound


def _parse(spec: str) -> list[tuple[str, frozenset[str]]]:
    out = []
    for m in re.finditer(r"(\w+)(?:\(([^)]*)\))?", spec):
        keywords = frozenset(k for k in (m.group(2) or "").split(",") if k)
        out.append((m.group(1), keywords))
    return out


# ------------------------------------------------------------------------- functions we define
def functional_setitem(base: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """`base[index] = value` on a copy: IR values are immutable."""
    out = base.clone()
    out[index] = value
    return out


def field(value: Any, name: str) -> Any:
    """A named part of a structured value: a key of a model output or dict, a field of a named
    tuple, a torch result (`topk(...).indices`) or a dataclass. Never an attribute of an arbitrary
    object (no methods, no private names)."""
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise AttributeError(f"{name!r} is not a field name")
    if isinstance(value, dict) and name in value:  # HF ModelOutput is an OrderedDict
        return value[name]
    if name in _field_names(value):
        return getattr(value, name)
    raise AttributeError(f"a {type(value).__name__} has no field {name!r}")


def _field_names(value: Any) -> tuple[str, ...]:
    kind = type(value)
    if isinstance(value, tuple) and kind.__module__ == "torch.return_types":
        return tuple(n for n in dir(kind) if not n.startswith("_") and n not in _STRUCTSEQ_MEMBERS)
    if isinstance(value, tuple):
        return getattr(kind, "_fields", ())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple(f.name for f in dataclasses.fields(value))  # a ModelOutput's unset fields are None
    return ()


_STRUCTSEQ_MEMBERS = ("count", "index", "n_fields", "n_sequence_fields", "n_unnamed_fields")


def python_operator(name: str, *args: Any) -> Any:
    """An operator on plain Python numbers, bounded: the result stays within int64, so a chain of
    ops cannot grow an integer without limit; strings and tuples are not repeated or joined."""
    if any(isinstance(a, (str, bytes, list, tuple, dict)) for a in args) and name != "getitem":
        raise TypeError(f"`{name}` on {', '.join(type(a).__name__ for a in args)} is not an op "
                        "of the vocabulary; arithmetic is on numbers and tensors")
    if name == "pow" and isinstance(args[1], int) and abs(args[1]) > 64 and args[0] not in (0, 1, -1):
        raise OverflowError(f"{args[0]} ** {args[1]} is too large")
    if name == "lshift" and isinstance(args[1], int) and args[1] > _MAX_SHIFT:
        raise OverflowError(f"{args[0]} << {args[1]} is too large")
    result = _OPERATORS[name](*args)
    if isinstance(result, int) and not -INT_BOUND <= result < INT_BOUND:
        raise OverflowError(f"`{name}` gives {str(result)[:20]}..., outside int64")
    return result


_OPERATORS: dict[str, Callable[..., Any]] = {n: getattr(operator, n) for n, _ in _parse(_OPERATOR_NAMES)}


# ---------------------------------------------------------------------------------- the table
def _add(table: dict[str, Entry], prefix: str, namespace: Any, spec: str, kind: str, section: str) -> None:
    for name, keywords in _parse(spec):
        func = getattr(namespace, name)
        full = f"{prefix}.{name}" if prefix else name
        table[full] = Entry(full, func, keywords, kind, section)


@functools.cache
def vocabulary() -> dict[str, Entry]:
    """Every name an experiment can reach: op name -> entry."""
    table: dict[str, Entry] = {}
    _add(table, "", operator, _OPERATOR_NAMES, "operator", "Python operators")
    table["setitem"] = Entry("setitem", functional_setitem, frozenset(), "operator", "Python operators")
    table["field"] = Entry("field", field, frozenset(), "operator", "Python operators")
    for spec, section in ((_ELEMENTWISE, "Elementwise"), (_LINEAR, "Products"), (_REDUCTIONS, "Reductions"),
                          (_SHAPES, "Shapes and indexing")):
        _add(table, "torch", torch, spec, "function", section)
        _add(table, "Tensor", torch.Tensor, spec, "method", section)
    _add(table, "torch", torch, _TORCH_ONLY, "function", "Joining and likes")
    _add(table, "torch", torch, _FACTORIES, "factory", "Factories")
    _add(table, "Tensor", torch.Tensor, _METHODS_ONLY, "method", "Tensor methods")
    _add(table, "Tensor", torch.Tensor, _INPLACE, "inplace", "In-place tensor methods")
    for name, _ in _parse(_PROPERTIES):
        table[f"Tensor.{name}"] = Entry(f"Tensor.{name}", operator.attrgetter(name), frozenset(), "property",
                                        "Tensor properties")
    _add(table, "torch.nn.functional", F, _FUNCTIONAL, "function", "torch.nn.functional (F)")
    _add(table, "torch.linalg", torch.linalg, _LINALG, "function", "torch.linalg")
    _add(table, "torch.special", torch.special, _SPECIAL, "function", "torch.special")
    _add(table, "torch.fft", torch.fft, _FFT, "function", "torch.fft")
    _add(table, "einops", einops, _EINOPS, "function", "einops")
    return table


@functools.cache
def _names_by_id() -> dict[int, str]:
    out: dict[int, str] = {}
    for name, entry in vocabulary().items():
        out.setdefault(id(entry.func), name)
    return out


def name_of(func: Callable[..., Any]) -> str | None:
    """The vocabulary name of a torch function (as `__torch_function__` sees it), if declared."""
    return _names_by_id().get(id(func))


def is_inplace(name: str) -> bool:
    entry = vocabulary().get(name)
    return entry is not None and entry.kind == "inplace"


def keyword_problem(name: str, keywords: list[str]) -> str | None:
    """Why the keyword arguments are not accepted by `name`, or None."""
    entry = vocabulary()[name]
    bad = [k for k in keywords if not entry.accepts(k)]
    if not bad:
        return None
    if "out" in bad:
        return f"`out=` is not allowed ({name} would write into an existing tensor); use the returned value"
    if "inplace" in bad:
        return "`inplace=` is not allowed in the IR: an in-place op is a call and a write"
    allowed = ", ".join(sorted(entry.keywords - {ANY_NAME})) or "none"
    return f"{name} takes no keyword argument {bad[0]!r} (allowed: {allowed})"


# ------------------------------------------------------------------------------ documentation
def markdown() -> str:
    """The vocabulary as a Markdown reference (docs/vocabulary.md)."""
    lines = ["# The vocabulary", "",
             "Generated by `python -m compiler.vocabulary` from `compiler/vocabulary.py`; a test keeps it in",
             "step. An experiment (Python proxies, `.ivx`, or an IR payload) can name these and nothing else.",
             "Keyword arguments each accepts are in parentheses; `out=`, devices, generators and callables",
             "are never accepted. In-place methods run on a copy: on a module's value they are a write in",
             "the IR, on a weight they are refused. `.ivx` spells `torch.nn.functional` as `F`, and also",
             "`linalg`, `special`, `fft`; a bare function name means `torch.`.", ""]
    by_section: dict[str, list[Entry]] = {}
    for entry in vocabulary().values():
        by_section.setdefault(entry.section, []).append(entry)
    for section, entries in by_section.items():
        lines += [f"## {section}", ""]
        shown = []
        for e in entries:
            kw = ", ".join("**axes" if k == ANY_NAME else k for k in sorted(e.keywords))
            shown.append(f"`{e.name}`" + (f" ({kw})" if kw else ""))
        lines += [", ".join(shown), ""]
    lines += ["## Tensor attributes", "", "`shape`, `dtype`, `ndim`, `device`, `size()`, `dim()` give concrete "
              "values inside a trace (from the fake-tensor check).", "",
              "## Module tree", "", "`model.<submodule>` and `[i]` walk the model's own modules; each has "
              "`.output`, `.input`, `.inputs` and `.next()`; its parameters and buffers are read-only values.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
