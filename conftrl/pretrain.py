"""`python -m conftrl.pretrain`: Pretrain the embedded tiny base model; the command is `conftrl.cli.pretrain`."""

from conftrl.cli.pretrain import main

if __name__ == "__main__":
    main()
