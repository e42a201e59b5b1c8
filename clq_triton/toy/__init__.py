"""A small class-conditional DiT trained by the project, to judge quantization quality on."""
