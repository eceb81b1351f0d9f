"""Converters between babyllama's `Weights` and other people's model files.

Every converter maps its own tensor names onto one flat state dict under llama2.c's (= Meta's) names
(`state_dict.py`), so converters meet in `Weights`, never in each other:

    meta.py  Meta's original checkpoints (params.json + consolidated.NN.pth shards)   ⇄ Weights
    hf.py    Hugging Face Llama (config.json + safetensors / pytorch_model.bin)       ⇄ Weights
    gguf.py  llama.cpp's GGUF with a sentencepiece vocabulary                         ⇄ Weights
             (written as f32, f16, bf16, q8_0 or q4_0; read: those, and llama.cpp's other block types)

(`export` writes Hugging Face and GGUF; `save_meta` is for Python callers and the tests.)

Only numpy is needed to import this package; torch (Meta shards, pytorch_model.bin), safetensors, gguf and
sentencepiece are imported by the functions that read or write those formats.
"""
