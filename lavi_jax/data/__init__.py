"""Data: sources (llava.py: LLaVA JSON/JSONL; tfds_data.py: TFDS ArrayRecord; synthetic.py:
built-in shapes; mixture.py), transforms (image.py, video.py), tokenizer.py, chat.py, the
record -> example step (sample.py) and the Grain pipeline (pipeline.py: `make_dataset`)."""
