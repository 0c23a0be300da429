"""Local fine-tuning of the reflection LoRA: data, SFT, GGUF export, the train pipeline.

torch and transformers are imported inside the functions that need them.
"""
