"""``python -m efficientgpt`` (and ``torchrun -m efficientgpt``) run the command-line tool."""

from efficientgpt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
