"""The safetensors format: `lora-tune merge` writes the merged model as standalone Hugging Face weights (merge.py),
streamed into shards (streaming.py, shard_writer.py), with a model card; verified through verify/."""
