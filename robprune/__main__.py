"""``python -m robprune ...`` is the ``robprune`` command."""
from robprune.tui.cli import main

if __name__ == "__main__":
    main()
