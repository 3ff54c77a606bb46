"""What a model is: the encoder registry and U-Net (networks), the card (card), the safetensors file (modelfile),
cost (summary) and export."""
