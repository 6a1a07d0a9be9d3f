"""The local control socket: how the process that launched Envoy reaches the gateway inside it.

The envoy engine runs the gateway's stages inside Envoy's process, where no signal handler of ours
runs; `tensorgate serve` keeps the signals (SIGTERM: drain, SIGHUP: reload) and passes them on
over a Unix socket that only this host's same user can open (mode 0600), never over the network:

    → "drain\\n"                    ← "ok draining\\n"
    → "reload <config JSON>\\n"     ← "ok <what changed>\\n" | "error <the loader's message>\\n"

One command per connection, one line each way.
"""

from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable

__all__ = ["ControlError", "send_control", "serve_control"]

Handler = Callable[[str], Awaitable[str]]
_LIMIT = 64 * 1024 * 1024  # a reload carries the whole config


class ControlError(Exception):
    """The gateway refused a control command; the message says why."""


async def serve_control(path: str, handlers: dict[str, Handler]) -> asyncio.AbstractServer:
    """Serve `handlers` (command name → async function of the argument, returning the reply) on `path`.
    A handler's exception is answered as an error line with its text."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode().rstrip("\n")
            command, _, argument = line.partition(" ")
            handler = handlers.get(command)
            try:
                if handler is None:
                    raise ControlError(f"unknown command {command!r}; expected one of: {', '.join(handlers)}")
                reply = "ok " + await handler(argument)
            except Exception as error:  # the caller reads why; the gateway keeps serving
                reply = "error " + (str(error) or type(error).__name__)
            writer.write(reply.replace("\n", " ").encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.start_unix_server(serve, path, limit=_LIMIT)
    os.chmod(path, 0o600)
    return server


async def send_control(path: str, command: str, argument: str = "", timeout: float = 30.0) -> str:
    """Send one command; its reply without the "ok " (ControlError with the reason on "error ...")."""

    async def exchange() -> str:
        reader, writer = await asyncio.open_unix_connection(path, limit=_LIMIT)
        try:
            writer.write(f"{command} {argument}".rstrip().encode() + b"\n")
            await writer.drain()
            return (await reader.readline()).decode().rstrip("\n")
        finally:
            writer.close()

    reply = await asyncio.wait_for(exchange(), timeout)
    status, _, text = reply.partition(" ")
    if status != "ok":
        raise ControlError(text or "the gateway closed the control connection without answering")
    return text
