"""The errors goldstick raises on purpose, all under one base class.

Every error a user can cause (a bad file, tensor, key, line or argument) is a ``GoldstickError`` whose message names
what is wrong and where; the ``goldstick`` command prints it on one line and exits with status 2. Anything else that
escapes is a bug. Each module keeps its own class (``CheckpointError`` in checkpoint.py, ``RecipeError`` in
recipe.py, ...) derived from ``GoldstickError`` and from the builtin it always was (``ValueError`` or
``RuntimeError``), so ``except ValueError`` written before this base existed still catches them:

    GoldstickError
    ├── CheckpointError (ValueError)     a checkpoint that cannot be read or holds bad values   checkpoint.py
    ├── ConfigError (ValueError)         config.json                                            config.py
    ├── RecipeError (ValueError)         a recipe, with every problem and its line               recipe.py
    ├── CalibrationError (ValueError)    calibration data                                       calibration.py
    ├── CEvalError (ValueError)          C-Eval data or options                                 ceval.py
    │   └── JobError                     a C-Eval regression job file                           ceval_jobs.py
    ├── AnalyzeError (ValueError)        the analysis command's inputs                          analyze.py
    ├── ExportError (ValueError)         what a format cannot hold                              export.py
    ├── QuantizeError (RuntimeError)     a quantization run that cannot go on                   engine.py
    ├── ServeError (RuntimeError)        a server that cannot start (its port is taken)          serve.py
    ├── StreamError (RuntimeError)       the data-free streaming path (non-finite weights, ...)  stream.py
    ├── WriterError (RuntimeError)       misuse of the sharded writer                           writer.py
    ├── TokenizerError (ValueError)      a missing or unreadable tokenizer.json                 errors.py
    ├── UsageError (ValueError)          an argument outside what it accepts                    errors.py
    └── VerifyError (ValueError)         a checkpoint that fails ``goldstick verify``           verification.py
"""

from __future__ import annotations


class GoldstickError(Exception):
    """Base of every error goldstick raises on purpose; the message names the file, tensor, key, line or argument."""


class UsageError(GoldstickError, ValueError):
    """An argument or option outside what it accepts (sampling parameters, backend, model size, ...)."""


class TokenizerError(GoldstickError, ValueError):
    """A model folder without a readable ``tokenizer.json``."""


# The exit status of the ``goldstick`` command for a GoldstickError (and for a user-given path that does not exist).
EXIT_INPUT_ERROR = 2
