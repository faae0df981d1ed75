"""`fasb-server` / `python -m server`: parse the settings, then serve until interrupted."""

from __future__ import annotations

import logging
import sys

import uvicorn

from server.api.app import create_app
from server.config import Settings, parse_args

log = logging.getLogger("server")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def settings_for_log(settings: Settings) -> dict[str, object]:
    shown = settings.model_dump()
    if shown["api_key"] is not None:
        shown["api_key"] = "***"
    return shown


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
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    server.run()
    if app.state.engine_failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
