"""Built-in tasks by name for ``--task NAME`` (options: ``--task-arg KEY=VALUE``): small real data sets that need no
download, and Hugging Face models on data files.

The data set factories take keyword options with defaults and return a ``gradindex.Task`` whose datasets are
``TensorDataset(float32 inputs, int64 targets)``, deterministic given ``seed``. The ``*_with_info``
variants also return a ``LabelNoise`` saying which training labels were flipped.

==================  =======================================================  ==================
name                data, model                                              train / test
==================  =======================================================  ==================
``digits``          sklearn 8x8 digits, MLP 64-32-10                         1347 / 450
``digits-cnn``      the same data as 1x8x8 images, small 2-D CNN             1347 / 450
``breast-cancer``   sklearn breast cancer, L2 logistic regression            426 / 143
``mnist1d``         MNIST-1D (``pip install mnist1d``), MLP 40-100-10        4000 / 1000
``mnist1d-cnn``     MNIST-1D as 1x40 signals, small 1-D CNN                  4000 / 1000
``hf-causal-lm``    a causal LM folder (``model=DIR``) on data files         ``train=``/``test=``
``hf-classifier``   a sequence classifier folder on data files               ``train=``/``test=``
==================  =======================================================  ==================

``procedural_corpus`` and ``word_tokenizer`` make the text of the GPT-2 demo (``gradindex demo gpt2``).
"""

from __future__ import annotations

from gradindex.task import BUILTIN_TASKS
from gradindex.tasks._breast_cancer import breast_cancer, l2_penalty
from gradindex.tasks._common import LabelNoise, flip_labels, mlp, stratified_split, tensor_dataset
from gradindex.tasks._digits import digits, digits_cnn, digits_with_info
from gradindex.tasks._hf import DATA_FILE_TYPES, hf_causal_lm, hf_classifier, read_rows
from gradindex.tasks._mnist1d import mnist1d, mnist1d_cnn, mnist1d_with_info
from gradindex.tasks._text import CORRUPTIONS, TextCorpus, procedural_corpus, word_tokenizer

__all__ = [
    "BUILTIN_TASKS",
    "CORRUPTIONS",
    "DATA_FILE_TYPES",
    "LabelNoise",
    "TextCorpus",
    "breast_cancer",
    "digits",
    "digits_cnn",
    "digits_with_info",
    "flip_labels",
    "hf_causal_lm",
    "hf_classifier",
    "l2_penalty",
    "mlp",
    "mnist1d",
    "mnist1d_cnn",
    "mnist1d_with_info",
    "procedural_corpus",
    "read_rows",
    "stratified_split",
    "tensor_dataset",
    "word_tokenizer",
]
