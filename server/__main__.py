"""`fasb-server` / `python -m server`: parse the settings, then serve until interrupted."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import uvicorn
from sse_starlette.sse import AppStatus

from server.api.app import begin_shutdown, create_app
from server.config import Settings, parse_args

log = logging.getLogger("server")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def settings_for_log(settings: Settings) -> dict[str, object]:
    shown = settings.model_dump()
    if shown["api_key"] is not None:
        shown["api_key"] = "***"
    return shown


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT also starts the app's drain (see begin_shutdown):
    uvicorn stops accepting connections and waits for the open ones, which the drain ends in time."""

    def __init__(self, config: uvicorn.Config, on_exit_signal) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            self._on_exit_signal()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    configure_logging(settings.log_level)
    log.info("settings: %s", settings_for_log(settings))
    server: uvicorn.Server | None = None

    def shut_down() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_engine_failure=shut_down)
    # log_config=None: uvicorn's loggers use the format above; access_log=False: the app logs one
    # richer line per request itself.
    # timeout_graceful_shutdown is a backstop only: the drain ends every request by shutdown_timeout.
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), log_config=None,
        access_log=False, timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5,
    )
    server = DrainingServer(config, on_exit_signal=lambda: begin_shutdown(app))
    # Our drain ends each stream with an error event and [DONE]; sse-starlette's own would cut it.
    AppStatus.disable_automatic_graceful_drain()
    # uvicorn re-raises the signal it stopped on once it has shut down; a drained SIGTERM is a clean
    # exit (status 0), so that re-raised SIGTERM is ignored.
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    server.run()
    if app.state.engine_failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
