"""The models: the LLaMA decoder (llama), the encoder-decoder Transformer (seq2seq), and where
pretrained weights and packaged data come from (sources)."""
