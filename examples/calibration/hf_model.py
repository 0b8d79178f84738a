"""A ``--model`` builder for ``cq calibrate``: any Hugging Face ``transformers`` model.

Data-free (random token ids), for a BERT-style encoder whose vocabulary has
unused ids below 999 and [CLS] = 101, [SEP] = 102::

    CQ_HF_MODEL=path/to/model cq calibrate --model examples/calibration/hf_model.py:build \\
        --random-tokens 999:30522 --first-token 101 --last-token 102 -o calib.safetensors
    cq convert path/to/model/model.safetensors -f nvfp4 --optimizer learned --calibration calib.safetensors

Layer names are the module names of ``AutoModel``; if the checkpoint's keys
carry a leading path (e.g. ``bert.``), pass it as ``--prefix``. Needs
``transformers`` (not a dependency of cq: ``pip install -e .[examples]``).
"""

import os


def build():
    from transformers import AutoModel

    return AutoModel.from_pretrained(os.environ["CQ_HF_MODEL"]).eval()
