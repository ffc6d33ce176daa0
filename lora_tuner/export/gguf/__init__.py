"""The GGUF format: the merged model as one file (export.py) or the adapter alone as a LoRA GGUF (lora.py), written
tensor by tensor (writer.py, vocabulary.py, kquants.py) with its Modelfile and report (beside.py); verified through
verify/, by llama.cpp itself where its binding is installed."""
