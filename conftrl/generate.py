"""`python -m conftrl.generate`: Generate images with a trained adapter; the command is `conftrl.cli.generate`."""

from conftrl.cli.generate import main

if __name__ == "__main__":
    main()
