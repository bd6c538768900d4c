"""``python -m qgalore_fx`` runs the ``qgalore-fx`` command line."""

from qgalore_fx.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
