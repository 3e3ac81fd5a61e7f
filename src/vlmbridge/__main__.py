"""`python -m vlmbridge` — same as the `vlmbridge` command."""

from vlmbridge.cli.app import main

raise SystemExit(main())
