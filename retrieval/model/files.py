"""The file names of a clipsearch checkpoint folder; free of heavy imports, so listing models needs no torch."""

FORMAT = "clipsearch-checkpoint"  # config.json's "format" in our own checkpoint folders
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"  # the architecture, name and provenance, as JSON
WEIGHTS_FILE = "model.safetensors"  # the tensors, under OpenAI's parameter names
TOKENIZER_FILE = "tokenizer.json"  # a hub model's Hugging Face tokenizer (SigLIP2's Gemma tokenizer)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # optional beside it: pad token, padding and truncation sides
