"""Teach einops about proxies, through its documented extension point (a backend subclass).

einops finds backends by walking `AbstractBackend.__subclasses__()`; this one accepts proxies and
reuses the torch backend's methods, which record as ordinary IR ops.
"""

from __future__ import annotations

from typing import Any

from einops._backends import TorchBackend

from interp_dsl.proxy import Proxy


class ProxyBackend(TorchBackend):
    framework_name = "interp_dsl"

    def is_appropriate_type(self, tensor: Any) -> bool:
        return isinstance(tensor, Proxy) and tensor._live
