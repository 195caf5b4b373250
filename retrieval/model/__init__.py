"""CLIP in PyTorch: configs, tokenizer, vision and text towers, preprocessing and checkpoint loading."""
