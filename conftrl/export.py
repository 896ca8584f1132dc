"""`python -m conftrl.export`: Merge an adapter into its base as a diffusers folder; the command is `conftrl.cli.export`."""

from conftrl.cli.export import main

if __name__ == "__main__":
    main()
