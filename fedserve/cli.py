"""The `fedserve` command: serve, worker, manage and demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from fedserve import config
from fedserve.memory import use_fixed_mmap_threshold

logger = logging.getLogger("fedserve.cli")


def _setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedserve.settings")
    import django

    django.setup()


def _migrate_if_embedded() -> None:
    from django.conf import settings
    from django.core.management import call_command

    if settings.EMBEDDED_DATABASE:
        call_command("migrate", interactive=False, verbosity=0)
        logger.info("database migrated: %s", settings.DATABASES["default"]["NAME"])


def serve(host: str, port: int, workers: int, threads: int, keepalive: int) -> None:
    """Run the API under gunicorn with threaded workers."""
    _setup_django()
    use_fixed_mmap_threshold()
    _migrate_if_embedded()

    from django.conf import settings

    from fedserve.api.uploads import remove_stale_spool_files

    remove_stale_spool_files(
        settings.FILE_UPLOAD_TEMP_DIR,
        config.env_int("FEDSERVE_SPOOL_MAX_AGE_SECONDS", 6 * 3600, minimum=0),
    )
    from gunicorn.app.base import BaseApplication

    from fedserve.wsgi import application

    if settings.EMBEDDED_DATABASE and workers != 1:
        # The in-process worker and SQLite's single writer want one process.
        logger.warning("the embedded default runs one process; ignoring --workers %s", workers)
        workers = 1

    class _Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": f"{host}:{port}",
                "workers": workers,
                "worker_class": "gthread",
                "threads": threads,
                # Uploads of large models and long polls hold a request open for minutes.
                "timeout": 0,
                # gunicorn's default of 2 s closes connections that participants reuse after
                # a short pause, such as loading a model. A close that crosses the next
                # request fails it without a response, so fewer closes mean fewer resends.
                "keepalive": keepalive,
                "graceful_timeout": 10,
                "accesslog": "-",
                "loglevel": os.environ.get("FEDSERVE_LOG_LEVEL", "info").lower(),
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            # Runs in each server process: background work and the periodic sweep start
            # with the process, so a restarted server resumes unfinished rounds.
            from fedserve import tasks

            tasks.start_in_process_runner()
            return application

    url_host = f"[{host}]" if ":" in host else host
    logger.info(
        "fedserve serves http://%s:%s/api/ (docs at /api/schema/swagger-ui/)", url_host, port
    )
    _Server().run()


def worker(concurrency: int) -> None:
    """Run a Celery worker for the background tasks."""
    _setup_django()
    use_fixed_mmap_threshold()
    from django.conf import settings

    if not settings.CELERY_BROKER_URL:
        sys.exit(
            "fedserve worker needs CELERY_BROKER_URL (for example redis://127.0.0.1:6379/0); "
            "without it, `fedserve serve` runs background work in-process."
        )
    from fedserve.tasks import app

    app.worker_main(
        ["worker", "--loglevel=INFO", f"--concurrency={concurrency}", "--beat"]
        if os.environ.get("FEDSERVE_WORKER_BEAT", "true").lower() in {"1", "true", "yes"}
        else ["worker", "--loglevel=INFO", f"--concurrency={concurrency}"]
    )


def manage(arguments: list[str]) -> None:
    """Pass arguments through to Django's management commands."""
    _setup_django()
    from django.core.management import execute_from_command_line

    execute_from_command_line(["fedserve manage", *arguments])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the API server")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve_parser.add_argument("--port", type=int, default=8000, help="TCP port to bind")
    serve_parser.add_argument(
        "--workers",
        type=int,
        default=config.env_int("FEDSERVE_WORKERS", 1, minimum=1),
        help="worker processes (production only; the embedded default uses one)",
    )
    serve_parser.add_argument(
        "--threads",
        type=int,
        default=config.env_int("FEDSERVE_THREADS", 32, minimum=1),
        help="request threads per worker process",
    )
    serve_parser.add_argument(
        "--keepalive",
        type=int,
        default=config.env_int("FEDSERVE_KEEPALIVE_SECONDS", 75, minimum=1),
        help="seconds an idle HTTP connection stays open for the client's next request",
    )

    worker_parser = commands.add_parser("worker", help="run a background worker (Celery)")
    worker_parser.add_argument("--concurrency", type=int, default=2, help="task processes")

    manage_parser = commands.add_parser("manage", help="run a Django management command")
    manage_parser.add_argument("arguments", nargs=argparse.REMAINDER)

    # The demo parses its own options (see `fedserve demo --help`), so -h goes through too.
    demo_parser = commands.add_parser(
        "demo", help="run a federated training end to end", add_help=False
    )
    demo_parser.add_argument("arguments", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the `fedserve` command; a configuration error ends it with one line, not a traceback."""
    try:
        _main(argv)
    except config.ConfigurationError as error:
        sys.exit(f"fedserve: invalid configuration: {error}")


def _main(argv: list[str] | None) -> None:
    raw_level = os.environ.get("FEDSERVE_LOG_LEVEL", "INFO")
    level = raw_level.upper()
    if level not in logging.getLevelNamesMapping():
        raise config.ConfigurationError(
            f"FEDSERVE_LOG_LEVEL={raw_level!r} is not a log level; "
            "use DEBUG, INFO, WARNING or ERROR."
        )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    parser = build_parser()
    # argparse.REMAINDER does not take options that come first (`demo --rounds 3`), so
    # the demo gets whatever the top-level parser does not recognize.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        serve(args.host, args.port, args.workers, args.threads, args.keepalive)
    elif args.command == "worker":
        worker(args.concurrency)
    elif args.command == "manage":
        manage(args.arguments)
    elif args.command == "demo":
        from fedserve.demo import main as demo_main

        demo_main([*unknown, *args.arguments])


if __name__ == "__main__":
    main()
