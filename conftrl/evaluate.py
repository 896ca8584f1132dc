"""`python -m conftrl.evaluate`: Score a trained adapter; the command is `conftrl.cli.evaluate`."""

from conftrl.cli.evaluate import main

if __name__ == "__main__":
    main()
