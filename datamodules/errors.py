"""The exceptions the data pipeline raises for bad input: a bad sample, an empty split."""


class BadSampleError(ValueError):
    """A sample that cannot become correct training data.

    `where` names the file (or sample key) and `problem` says what is wrong with it, so the
    message alone tells a user what to fix. Under ``on_bad_sample: skip`` the pipeline
    catches exactly this type; any other exception is a bug and propagates.
    """

    def __init__(self, where: object, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = str(where)
        self.problem = problem


class EmptySplitError(ValueError):
    """A split that a stage needs (train and val to fit, test to test) has no samples."""
