"""``python -m promcse`` runs the CLI."""

from promcse.cli import main

raise SystemExit(main())
