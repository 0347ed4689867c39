"""The stages of BiSSL, each a loop on :mod:`bissl.engine`: pretrain, align, finetune, evaluate (and hpo).

The four stage functions are the Python API (their configs: :mod:`bissl.config`)::

    from bissl.stages import align, evaluate, finetune, pretrain

They shadow their modules as attributes of this package; import a module's other names from it directly
(``from bissl.stages.pretrain import build_backbone_from_config``).
"""

from bissl.stages.align import align
from bissl.stages.evaluate import evaluate
from bissl.stages.finetune import finetune
from bissl.stages.pretrain import pretrain

__all__ = ["align", "evaluate", "finetune", "pretrain"]
