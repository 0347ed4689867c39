"""The stages of BiSSL, each a loop on :mod:`bissl.engine`: pretrain, align, finetune, evaluate (and hpo)."""
