"""`python -m proclock`: the command line."""

from proclock._cli import main

raise SystemExit(main())
