"""Training: data preparation (download, vocabulary, pretokenization), the PyTorch training loop (single
device or torchrun DDP/FSDP), checkpoints and metrics. Everything here needs the `train` extra (torch,
sentencepiece, tqdm, matplotlib); nothing on the inference path imports it."""
