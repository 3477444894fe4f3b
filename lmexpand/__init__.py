"""lmexpand: grow pretrained Hugging Face language models by model surgery.

Importing the package is cheap on purpose (no torch, no transformers): the CLI's
``--help`` and ``--version`` must answer in well under a second.
"""

__version__ = "0.1.0"
