"""The `sdrt` command line."""


def main() -> None:
    from sdrt.cli.app import app

    app()
