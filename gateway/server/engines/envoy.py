"""The envoy engine's entry inside Envoy's embedded Python: the ASGI `app` that pyvoy serves.

pyvoy imports "gateway.server.engines.envoy:app" in the Envoy process that
gateway/server/engines/envoy_server.py launches. `app` is a `GrpcAsgiApp`
(gateway/server/engines/grpc_asgi.py) built on first access from the environment the launcher set:
the services factory that builds the gateway on each of pyvoy's event loops, its one argument, and
the app's options.
"""

from __future__ import annotations

import json
import os

from gateway.server.engines.grpc_asgi import GrpcAsgiApp

__all__ = ["ENV_ARGUMENT", "ENV_OPTIONS", "ENV_SERVICES"]  # and `app`, built on first access

ENV_SERVICES = "TENSORGATE_ENVOY_SERVICES"
"""The services factory, "module:attr", for the module-level `app`."""
ENV_ARGUMENT = "TENSORGATE_ENVOY_ARGUMENT"
"""The factory's one argument (a string, e.g. a config file path); unset: called without one."""
ENV_OPTIONS = "TENSORGATE_ENVOY_OPTIONS"
"""JSON of GrpcAsgiApp keyword options (max_message_bytes, tick_s, poll_s)."""


def _app_from_environment() -> GrpcAsgiApp:
    services = os.environ.get(ENV_SERVICES)
    if not services:
        raise RuntimeError(f"{ENV_SERVICES} is not set: it names the factory of the Methods to serve (module:attr)")
    options = json.loads(os.environ.get(ENV_OPTIONS) or "{}")
    return GrpcAsgiApp(services=services, argument=os.environ.get(ENV_ARGUMENT), **options)


def __getattr__(name: str):
    # `app` is built on first access (pyvoy's getattr), from the environment the launcher set.
    if name == "app":
        application = _app_from_environment()
        globals()["app"] = application
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
