"""``python -m vlexport.cli``: the same as the `vlexport` command."""

from vlexport.cli import main

if __name__ == "__main__":
    main()
