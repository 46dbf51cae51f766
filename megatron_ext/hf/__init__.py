"""Hugging Face side of the checkpoint story: the per-family name/layout tables
(:mod:`.mapping`) and safetensors/config file handling (:mod:`.files`)."""
